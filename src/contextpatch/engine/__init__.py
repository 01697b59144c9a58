"""The HF engine: (1) capture with-context targets at query positions, (2) the patched context-free pass.

See docs/engine.md for the interface between the two steps.
"""

from ._capture import CaptureResult, Targets, capture_targets
from ._container import ContextPatches, config_hash, weight_fingerprint
from ._dynamics import PrefixDynamics, dynamics_from_patches, prefix_dynamics
from ._extract import Verification, extract, run_patched, verify
from ._generate import GenerationResult, generate
from ._layout import QueryLayout, make_layout
from ._patched import PatchedResult, PatchSession, patched_pass, resolve_slot
from ._shared import (
    extract_many,
    extract_prefixes,
    extract_prefixes_naive,
    packed_attention_mask,
    packed_targets,
)
from ._static import evaluate_static, fit_static
from ._static_patches import StaticPatches

__all__ = ["CaptureResult", "Targets", "capture_targets", "ContextPatches", "config_hash", "weight_fingerprint",
           "Verification", "extract", "run_patched", "verify", "GenerationResult", "generate", "QueryLayout",
           "make_layout", "PatchedResult", "PatchSession", "patched_pass", "resolve_slot", "extract_many",
           "extract_prefixes", "extract_prefixes_naive", "packed_attention_mask", "packed_targets", "PrefixDynamics",
           "dynamics_from_patches", "prefix_dynamics", "fit_static", "evaluate_static", "StaticPatches"]
