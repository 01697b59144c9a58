"""The declarative adapter record: where a HuggingFace family keeps the pieces the patches need.

A block of every supported family is read as

    r   = residual stream just before the MLP output is added          (the "residual source")
    z   = MLP input                                                     (input of ``mlp``)
    out = r + Slot(MLP(z))                                              (Slot: identity, or a post-norm)

and patched by (Goldwaser et al. 2025, Thm 5 pattern; docs/theory.md §3.1):

    every matrix W_m reading z:   ΔW_m = W_m (z_C − z) zᵀ/‖z‖²          (rank 1, shared right factor)
    the output slot absorbs δ = r_C − r:
        "bias"   Δb = δ                       (MLP output bias)
        "weight" ΔW_out = δ gᵀ/‖g‖²           (g = input of the output matrix)
        "scale"  Δs = δ ⊘ u                   (u = unscaled RMS-normalised post-MLP vector, Gemma-2/3)
        "moe"    router + every expert's gate_up rank-1 in, active experts' down_proj rank-1 out

Residual source spellings (``residual``):
    "norm:<path>"      input of the pre-MLP norm (sequential pre-norm blocks: GPT-2, Llama, Gemma-2/3 …)
    "mlp"              the MLP input itself (BERT post-LN: the attention sub-layer output)
    "parallel:<path>"  block input + output of the attention module at <path> (Phi, GPT-J, NeoX, Falcon)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._errors import UnsupportedModelError

__all__ = ["FamilyAdapter", "ResolvedBlock", "get_submodule"]


@dataclass(frozen=True)
class FamilyAdapter:
    """One HF family: module paths (relative to a block) and the patch recipe. No code, only names."""

    name: str                              # CLI/arch name, e.g. "llama"
    model_types: tuple[str, ...]           # config.model_type values served
    blocks: tuple[str, ...]                # candidate paths of the block ModuleList (first found wins)
    mlp: str                               # module whose first input is the MLP input z
    residual: str                          # residual source, see module docstring
    inputs: tuple[str, ...] = ()           # matrices reading z (get the rank-1 input patch)
    output: str | None = None              # the MLP output matrix
    slot: str = "auto"                     # "auto" (bias if the output matrix has one, else weight),
    #                                        "weight", "scale:<post-norm path>", "moe"
    conv1d: bool = False                   # GPT-2 Conv1D stores W transposed: (d_in, d_out)
    scale_offset: float = 0.0              # scale = offset + weight (Gemma: 1 + w)
    router: str | None = None              # MoE router (E, d) and experts module (3-D weights)
    experts: str | None = None
    causal: bool = True                    # False: bidirectional encoder (context = every other token)
    when: Callable[[Any], bool] | None = field(default=None, compare=False)  # config predicate
    variant: str = ""                      # human name of the patch variant (docs, metadata)
    float64_floor: float = 1e-10           # tolerance bar used by tests/benchmarks (see tests)

    @property
    def slot_kind(self) -> str:
        return self.slot.split(":", 1)[0]

    def matches(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types and (self.when is None or self.when(config))

    def find_blocks(self, model: nn.Module) -> nn.ModuleList:
        for path in self.blocks:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                return mod
        raise UnsupportedModelError(f"{type(model).__name__}: no block list at any of {list(self.blocks)} "
                                    f"(adapter {self.name!r})")

    def resolve(self, model: nn.Module) -> list[ResolvedBlock]:
        """The modules of every block, looked up once."""
        out = []
        for i, blk in enumerate(self.find_blocks(model)):
            kind, _, path = self.residual.partition(":")
            out.append(ResolvedBlock(
                index=i, block=blk, mlp=get_submodule(blk, self.mlp),
                residual_kind=kind, residual_module=get_submodule(blk, path) if path else None,
                inputs={name: get_submodule(blk, name) for name in self.inputs},
                output=get_submodule(blk, self.output) if self.output else None,
                scale_norm=get_submodule(blk, self.slot.split(":", 1)[1]) if self.slot_kind == "scale" else None,
                router=get_submodule(blk, self.router) if self.router else None,
                experts=get_submodule(blk, self.experts) if self.experts else None,
            ))
        return out


@dataclass
class ResolvedBlock:
    """The concrete modules of one block (what the hooks attach to)."""

    index: int
    block: nn.Module
    mlp: nn.Module
    residual_kind: str                    # "norm" | "mlp" | "parallel"
    residual_module: nn.Module | None     # the norm (its input is r) or the attention module (parallel)
    inputs: dict[str, nn.Module]
    output: nn.Module | None
    scale_norm: nn.Module | None
    router: nn.Module | None
    experts: nn.Module | None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedModelError(f"{type(root).__name__} has no submodule {path!r}: {e}") from None
