"""Implicit dynamics of a real model over the prefixes of its context (docs/theory.md §2.1 scheme (a), §2.3).

For layer ℓ and prefix c_1..c_i, ΔW_i is the layer's rank-1 patch on its first MLP input matrix (the paper's
W: GPT-2 ``c_fc``, Llama ``gate_proj``, …) that makes the context-free query behave as with the prefix.
Reported per layer and per query token:

    ‖ΔW_i‖_F                  for i = 1..n
    ‖ΔW_{i+1} − ΔW_i‖_F        for i = 1..n−1   (the marginal effect of token c_{i+1})

and the same two norms for the layer's output-slot patch (bias, rank-1 output weight or post-norm scale).

Differences of rank-1 factors are evaluated in float64 from their Gram matrices, never densely:
‖U₁V₁ᵀ − U₀V₀ᵀ‖² = ‖U₁‖²‖V₁‖² + ‖U₀‖²‖V₀‖² − 2 (U₁·U₀)(V₁·V₀).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from .._patches import LowRankPatch
from ._context_patches import ContextPatches
from ._records import LayerPatch
from ._shared_context import extract_prefixes

__all__ = ["PrefixDynamics", "prefix_dynamics", "dynamics_from_patches"]


@dataclass
class PrefixDynamics:
    """Per-layer norms over prefixes. ``patch_norms``: (L, n, T), ``step_norms``: (L, n−1, T), float64."""

    prefix_lengths: list[int]
    matrices: list[str]
    patch_norms: Tensor
    step_norms: Tensor
    weight_norms: list[float]
    meta: dict[str, Any] = field(default_factory=dict)
    output_patch_norms: Tensor | None = None   # (L, n, T) ‖output-slot patch‖ (None for MoE)
    output_step_norms: Tensor | None = None    # (L, n−1, T)

    @property
    def num_layers(self) -> int:
        return self.patch_norms.shape[0]

    def to_dict(self, token: int = -1) -> dict[str, Any]:
        """JSON-ready numbers at one query token (default: the last)."""
        return {
            "prefix_lengths": self.prefix_lengths,
            "matrices": self.matrices,
            "weight_norms": self.weight_norms,
            "patch_norms": self.patch_norms[..., token].tolist(),
            "step_norms": self.step_norms[..., token].tolist(),
            "step_last_over_first": [float(s[-1] / s[0]) if len(s) and float(s[0]) > 0 else None
                                     for s in self.step_norms[..., token]],
            "output_slot": self.meta.get("slot"),
            "output_patch_norms": None if self.output_patch_norms is None
            else self.output_patch_norms[..., token].tolist(),
            "output_step_norms": None if self.output_step_norms is None
            else self.output_step_norms[..., token].tolist(),
            "meta": self.meta,
        }


def _first_matrix(layer: LayerPatch) -> tuple[str, LowRankPatch]:
    """The paper's W: the first matrix reading the MLP input (the router for MoE)."""
    if layer.inputs:
        return next(iter(layer.inputs.items()))
    if layer.router is not None:
        return "router", layer.router
    raise ContextPatchError("these patches have no input-side matrix patch")


def _rank1_norms(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """‖U_i V_iᵀ‖ for every row i and ‖U_{i+1}V_{i+1}ᵀ − U_iV_iᵀ‖ for consecutive rows, in float64."""
    U, V = U.double(), V.double()
    uu, vv = (U * U).sum(-1), (V * V).sum(-1)
    cross = (U[1:] * U[:-1]).sum(-1) * (V[1:] * V[:-1]).sum(-1)
    return (uu * vv).sqrt(), (uu[1:] * vv[1:] + uu[:-1] * vv[:-1] - 2 * cross).clamp_min(0).sqrt()


def _vector_norms(D: Tensor) -> tuple[Tensor, Tensor]:
    D = D.double()
    return D.norm(dim=-1), (D[1:] - D[:-1]).norm(dim=-1)


def _output_norms(layer: LayerPatch) -> tuple[Tensor, Tensor] | None:
    if layer.out_weight is not None:
        return _rank1_norms(layer.out_weight.U[..., 0], layer.out_weight.V[..., 0])
    for t in (layer.out_bias, layer.out_scale):
        if t is not None:
            return _vector_norms(t)
    return None  # MoE: one output patch per active expert


def dynamics_from_patches(patches: ContextPatches) -> PrefixDynamics:
    """Norms of ΔW_i and of ΔW_{i+1} − ΔW_i from prefix patches (rows = consecutive prefixes).

    Also the output-slot patch (Δb, ΔW_out or Δs) over the prefixes: in parallel blocks (Phi, GPT-J, NeoX,
    Falcon) the MLP input does not depend on the context, the input patch is 0 and the output slot carries it all.
    """
    pn, sn, names, opn, osn = [], [], [], [], []
    for layer in patches.layers:
        name, W = _first_matrix(layer)
        p, s = _rank1_norms(W.U[..., 0], W.V[..., 0])                     # (n, T), (n−1, T)
        pn.append(p)
        sn.append(s)
        names.append(name)
        o = _output_norms(layer)
        if o is not None:
            opn.append(o[0])
            osn.append(o[1])
    meta = patches.meta.to_dict()
    weight_norms = [w.get("in") for w in meta.pop("weight_norms", [])]
    shared = patches.meta.options.get("shared_context") or {}
    lengths = shared.get("prefix_lengths", list(range(1, patches.batch_shape[0] + 1)))
    full = len(opn) == len(pn)
    return PrefixDynamics(list(lengths), names, torch.stack(pn).cpu(), torch.stack(sn).cpu(), weight_norms, meta,
                          torch.stack(opn).cpu() if full else None, torch.stack(osn).cpu() if full else None)


def prefix_dynamics(model: nn.Module, context_ids: Tensor, query_ids: Tensor, **kwargs) -> PrefixDynamics:
    """Per-layer ‖ΔW_i‖ and ‖ΔW_{i+1} − ΔW_i‖ over the prefixes i = 1..n of the context, from ONE packed
    context pass and one batched patched pass (see :func:`extract_prefixes` for the options)."""
    return dynamics_from_patches(extract_prefixes(model, context_ids, query_ids, **kwargs))
