"""contextpatch: a transformer's context as exact weight patches (Dherin et al. 2025 and follow-ups)."""

from ._errors import ContextPatchError, DegenerateNormError, PatchFileError, UnsupportedModelError
from ._patches import LowRankPatch, ScalePatch, VectorPatch, stack_patches, sum_patches
from .adapters import SUPPORTED_FAMILIES, get_adapter
from .engine import (
    ContextPatches,
    GenerationResult,
    PrefixDynamics,
    StaticPatches,
    Verification,
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
from .theory import (
    GDDynamics,
    ProductDynamics,
    bias_patch,
    gd_dynamics,
    input_patch,
    linear_attention_patch,
    linear_loss,
    normalized_inner,
    output_weight_patch,
    product_dynamics,
    residual_patch,
    scale_patch,
    static_patch,
    token_patch,
)

__version__ = "0.1.0"

__all__ = [
    "ContextPatchError", "DegenerateNormError", "PatchFileError", "UnsupportedModelError",
    "LowRankPatch", "ScalePatch", "VectorPatch", "stack_patches", "sum_patches",
    "GDDynamics", "ProductDynamics", "bias_patch", "gd_dynamics", "input_patch", "linear_attention_patch",
    "linear_loss", "normalized_inner", "output_weight_patch", "product_dynamics", "residual_patch",
    "scale_patch", "static_patch", "token_patch",
    "ContextPatches", "GenerationResult", "Verification", "extract", "generate", "run_patched", "verify",
    "extract_many", "extract_prefixes", "prefix_dynamics", "PrefixDynamics",
    "fit_static", "evaluate_static", "StaticPatches",
    "SUPPORTED_FAMILIES", "get_adapter",
]
