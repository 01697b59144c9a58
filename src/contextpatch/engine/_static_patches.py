"""``StaticPatches``: a query-independent adapter for one fixed context (fitted by :func:`fit_static`).

Per layer, named factors with NO token dimensions (nn.Linear orientation, ΔW = U Vᵀ: (d_out, d_in)):

    "in.<path>.U", "in.<path>.V"   (d_out, r), (d_in, r)   every matrix W_m reading the MLP input z
    "out.bias"                     (d,)                    bias slot:   b ← b + Δb
    "out.U", "out.V"               (d, r), (d_g, r)        weight slot: W_out ← W_out + U Vᵀ
    "out.scale"                    (d,)                    scale slot (Gemma-2/3 post-FF norm): out ← out + Δs ⊙ u

``applied(model)`` adds them to EVERY token of ANY input as side paths ``y ← y + (x V) Uᵀ`` (+ Δb, + Δs ⊙ u),
computed in the compute dtype (≥ float32) and never materialising W + ΔW; the weights are untouched. GPT-2's
Conv1D weight is (d_in, d_out), the side path is orientation-free. Files: ``static.safetensors`` +
``static.json`` (SHA-256 of the tensor file, config hash and weight fingerprint of the model), written
atomically; a wrong model or a damaged file raises :class:`PatchFileError`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._patches import LowRankPatch, ScalePatch, VectorPatch
from ..adapters import get_adapter
from ._common import compute_dtype
from ._files import check_same_model, load_patch_dir, save_patch_dir
from ._patched import _eps, _rms_unit

__all__ = ["StaticPatches", "static_hooks"]

FORMAT, FORMAT_VERSION = "contextpatch-static", 1
_NAME = "static"


def static_hooks(model: nn.Module, layers: list[dict[str, Tensor]], slot: str) -> list:
    """Forward hooks adding the static factors of ``layers`` to every token; returns the handles.

    Factors are looked up at call time, so a dict filled during a forward pass (the fit) is applied from then on.
    """
    cd = compute_dtype(next(model.parameters()).dtype)
    handles = []

    def get(P: dict, key: str, like: Tensor) -> Tensor | None:
        t = P.get(key)
        return None if t is None else t.to(device=like.device, dtype=cd)

    def lowrank(P: dict, prefix: str):
        def hook(mod, args, out):
            U, V = get(P, prefix + "U", out), get(P, prefix + "V", out)
            return out if U is None else out + ((args[0].to(cd) @ V) @ U.T).to(out.dtype)
        return hook

    def bias(P: dict):
        def hook(mod, args, out):
            b = get(P, "out.bias", out)
            return out if b is None else out + b.to(out.dtype)
        return hook

    def scale(P: dict, eps: float):
        def hook(mod, args, out):
            s = get(P, "out.scale", out)
            return out if s is None else out + (s * _rms_unit(args[0].to(cd), eps)).to(out.dtype)
        return hook

    for b, P in zip(get_adapter(model).resolve(model), layers, strict=True):
        for name, mod in b.inputs.items():
            handles.append(mod.register_forward_hook(lowrank(P, f"in.{name}.")))
        if slot == "bias":
            handles.append(b.output.register_forward_hook(bias(P)))
        elif slot == "weight":
            handles.append(b.output.register_forward_hook(lowrank(P, "out.")))
        elif slot == "scale":
            handles.append(b.scale_norm.register_forward_hook(scale(P, _eps(b.scale_norm))))
    return handles


@dataclass
class StaticPatches:
    """Query-independent patches of one context: ``layers[ℓ]`` named factors (module docstring) and ``meta``
    (family, slot, config hash, weight fingerprint, dtype, context ids, calibration size, ridge, rank, seed, …)."""

    layers: list[dict[str, Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def slot(self) -> str:
        return self.meta["slot"]

    @property
    def context_ids(self) -> Tensor:
        return torch.tensor(self.meta["context_ids"], dtype=torch.long)

    def to(self, device) -> StaticPatches:
        return StaticPatches([{k: v.to(device) for k, v in P.items()} for P in self.layers], dict(self.meta))

    def nbytes(self) -> int:
        """Bytes held by all factors and vectors."""
        return sum(v.numel() * v.element_size() for P in self.layers for v in P.values())

    # --- typed views / summary ------------------------------------------------------------
    def layer_patches(self, layer: int) -> dict[str, LowRankPatch | VectorPatch | ScalePatch]:
        """Layer ``layer`` as typed patches keyed by module path (matrices in nn.Linear orientation)."""
        P, out = self.layers[layer], {}
        for k in P:
            if k.startswith("in.") and k.endswith(".U"):
                out[k[3:-2]] = LowRankPatch(P[k], P[k[:-1] + "V"])
        if "out.U" in P:
            out[self.meta["output_module"]] = LowRankPatch(P["out.U"], P["out.V"])
        if "out.bias" in P:
            out[self.meta["output_module"] + ".bias"] = VectorPatch(P["out.bias"])
        if "out.scale" in P:
            out[self.meta["scale_module"] + ".weight"] = ScalePatch(P["out.scale"])
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: ‖ΔW_in‖_F (all input matrices), its size relative to ‖W_in‖, the largest input rank, the
        output slot, ‖Δb‖ / ‖ΔW_out‖_F / ‖Δs‖ (relative to ‖W_out‖ or ‖s‖ where known) and the output rank."""
        rows = []
        norms = self.meta.get("weight_norms") or [{}] * self.num_layers
        for i in range(self.num_layers):
            typed = self.layer_patches(i)
            ins = [p for k, p in typed.items() if k in self.meta["input_modules"]]
            d_in = float(sum(float(p.norm()) ** 2 for p in ins) ** 0.5)
            out = next(p for k, p in typed.items() if k not in self.meta["input_modules"])
            d_out = float(out.norm())
            ref_out = norms[i].get("scale" if self.slot == "scale" else "out")
            rows.append({"layer": i, "dW_in": d_in, "dW_in_rel": d_in / norms[i]["in"] if norms[i].get("in") else None,
                         "rank_in": max(p.rank for p in ins), "out": self.slot, "d_out": d_out,
                         "d_out_rel": d_out / ref_out if ref_out and self.slot != "bias" else None,
                         "rank_out": out.rank if isinstance(out, LowRankPatch) else None})
        return rows

    # --- apply ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PatchFileError` unless ``model`` is the model these patches were fitted on."""
        check_same_model(self.meta, model, self.num_layers, "the patches of this static adapter")

    @contextmanager
    def applied(self, model: nn.Module):
        """While active, every forward pass of ``model`` (any tokens, batch size, length) runs with the static
        patches as side paths. The parameters are never modified; the hooks are removed on exit."""
        self.check_model(model)
        handles = static_hooks(model, self.layers, self.slot)
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    # --- save / load ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``static.safetensors`` + ``static.json`` into ``directory`` (atomic); returns the directory."""
        return save_patch_dir(directory, _NAME, FORMAT, FORMAT_VERSION, self.layers, self.meta)

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None) -> StaticPatches:
        """Read an adapter written by :meth:`save`; :class:`PatchFileError` on any missing or damaged file."""
        layers, _, meta = load_patch_dir(directory, _NAME, FORMAT, FORMAT_VERSION, what="static adapter",
                                         device=device)
        return cls(layers, meta)
