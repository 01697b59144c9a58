"""The HF engine: (1) capture with-context targets at query positions, (2) the patched context-free pass.

Modules, in import order (each imports only those before it): ``_model`` (model checks, forward calls, the
residual-stream tap), ``_layout`` (which tokens are context), ``_records`` (LayerPatch, PatchMeta),
``_identity`` (config hash, weight fingerprint), ``_files`` (the on-disk format), ``_step1_capture``,
``_moe``, ``_step2_patched``, ``_context_patches``, ``_extract`` (extract / verify / run_patched),
``_generate``, ``_shared_context`` (many queries and every prefix over one context pass), ``_dynamics``,
``_attention_slot`` (the attention-output patch of static adapters), ``_export`` (peft / merged exports),
``_static_patches``, ``_static_fit``, ``_static_encoder`` (encoder prefixes), ``_distill`` (LoRA context
distillation, the anchor for static adapters). See docs/engine.md for the interface between the two steps.
"""

from ._context_patches import ContextPatches
from ._distill import DistillResult, distill_lora
from ._dynamics import PrefixDynamics, dynamics_from_patches, prefix_dynamics
from ._extract import Verification, extract, reference_output, run_patched, verify
from ._generate import GenerationResult, generate
from ._identity import config_hash, weight_fingerprint
from ._layout import QueryLayout, make_layout
from ._records import LayerPatch, OutputPatch, PatchMeta
from ._shared_context import (
    extract_many,
    extract_prefixes,
    extract_prefixes_naive,
    packed_attention_mask,
    packed_targets,
)
from ._static_encoder import fit_static_encoder
from ._static_fit import evaluate_static, fit_static
from ._static_patches import StaticPatches
from ._step1_capture import CaptureResult, Targets, capture_targets
from ._step2_patched import PatchedResult, PatchSession, patched_pass, resolve_slot

__all__ = ["CaptureResult", "Targets", "capture_targets", "ContextPatches", "config_hash", "weight_fingerprint",
           "Verification", "extract", "reference_output", "run_patched", "verify", "GenerationResult", "generate",
           "QueryLayout", "make_layout", "LayerPatch", "OutputPatch", "PatchMeta", "PatchedResult", "PatchSession",
           "patched_pass", "resolve_slot", "extract_many", "extract_prefixes", "extract_prefixes_naive",
           "packed_attention_mask", "packed_targets", "PrefixDynamics", "dynamics_from_patches", "prefix_dynamics",
           "fit_static", "evaluate_static", "StaticPatches", "DistillResult", "distill_lora",
           "fit_static_encoder"]
