"""contextpatch: a transformer's context as exact weight patches (Dherin et al. 2025 and follow-ups).

The top level holds what the README's examples type; everything else is importable from its submodule:
``contextpatch.theory`` (pure tensor functions), ``contextpatch.blocks`` (the paper's objects as modules),
``contextpatch.adapters`` (one record per HF family), ``contextpatch.engine`` (both engine steps, records,
shared-context passes), ``contextpatch.experiments`` (the paper's regression experiments).
"""

from ._errors import ContextPatchError, DegenerateNormError, PatchFileError, UnsupportedModelError
from ._patches import LowRankPatch
from .adapters import SUPPORTED_FAMILIES
from .engine import (
    ContextPatches,
    OutputPatch,
    StaticPatches,
    evaluate_static,
    extract,
    extract_many,
    extract_prefixes,
    fit_static,
    generate,
    prefix_dynamics,
    run_patched,
    verify,
)
from .theory import token_patch

__version__ = "0.2.0"

__all__ = [
    "ContextPatchError", "DegenerateNormError", "PatchFileError", "UnsupportedModelError",
    "LowRankPatch", "token_patch", "OutputPatch", "SUPPORTED_FAMILIES",
    "extract", "verify", "run_patched", "generate", "ContextPatches",
    "extract_many", "extract_prefixes", "prefix_dynamics",
    "fit_static", "evaluate_static", "StaticPatches",
]
