"""``ContextPatches``: the exact per-token patches of one extraction; apply, summarise, save, load.

Files (``save(dir)``): ``patches.safetensors`` and ``patches.json`` (``_files.py``: integrity of both files,
typed metadata, atomic writes). ``applied(model)`` and ``run(model)`` raise :class:`PatchFileError` unless the
model has the config hash and weight fingerprint the patches were extracted from.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import PatchFileError
from .._patches import LowRankPatch, ScalePatch, VectorPatch
from ..adapters import get_adapter
from ._files import load_patch_dir, save_patch_dir
from ._identity import check_same_model
from ._model import model_output, run_model
from ._records import LayerPatch, PatchMeta
from ._step2_patched import PatchSession

__all__ = ["ContextPatches"]

_NAME, _FORMAT = "patches", "contextpatch"
_BLOCK_KEYS = ("query_ids", "position_ids", "valid", "query_index", "context_mask")


@dataclass
class ContextPatches:
    """The context of one extraction as patches, for B rows × T_q kept tokens × L layers.

    Attributes:
        layers: one :class:`LayerPatch` per block, per-token factors with leading dims (B, T_q).
        query_ids: (B, T_q) the kept token ids (context-free input).
        position_ids: (B, T_q) their positions in the context-free pass.
        valid: (B, T_q) bool, False on padding slots.
        query_index: (B, T_q) positions of the kept tokens in the original sequence.
        context_mask: (B, T) bool, which tokens of the original sequence were context.
        meta: :class:`PatchMeta` (family, slot, model identity, dtype, options, ‖W‖ per layer).
    """

    layers: list[LayerPatch]
    query_ids: Tensor
    position_ids: Tensor
    valid: Tensor
    query_index: Tensor
    context_mask: Tensor
    meta: PatchMeta

    # --- shape ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_shape(self) -> tuple[int, int]:
        return tuple(self.query_ids.shape)

    @property
    def attention_mask(self) -> Tensor | None:
        """Context-free padding mask: None for causal models (right padding is never seen by a real token, and
        a mask would leave padding rows fully masked under a sliding window: NaN in float64)."""
        return None if bool(self.valid.all()) or self.meta.options.get("causal", True) else self.valid.long()

    def to(self, device) -> ContextPatches:
        return ContextPatches([lp.map(lambda t: t.to(device)) for lp in self.layers],
                              *(getattr(self, k).to(device) for k in _BLOCK_KEYS), meta=self.meta)

    def nbytes(self) -> int:
        """Bytes held by the patch factors of all layers."""
        return sum(lp.nbytes() for lp in self.layers)

    # --- typed views ---------------------------------------------------------------------
    def layer_patches(self, layer: int) -> dict[str, LowRankPatch | VectorPatch | ScalePatch]:
        """Layer ``layer``'s patches keyed by module path (batch dims (B, T_q); MoE experts (B, T_q, E))."""
        return self.layers[layer].by_module(self.meta.output_module, self.meta.scale_module)

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: ‖ΔW_in‖_F, ‖ΔW_in‖/‖W_in‖, the output patch norm (‖Δb‖, ‖ΔW_out‖ or ‖Δs‖) and its
        relative size, min ‖z‖; norms are the max over the valid tokens of all rows."""
        rows = []
        vm = self.valid
        wn = self.meta.weight_norms or [{}] * self.num_layers

        def tokmax(x: Tensor) -> float:
            x = x.to(vm.device)
            return float(torch.where(vm, x, torch.zeros_like(x)).max())

        for layer, lp in enumerate(self.layers):
            ins = list(lp.inputs.values()) + ([lp.router] if lp.router is not None else [])
            vnorm = torch.linalg.vector_norm(ins[0].V[..., 0], dim=-1)
            usq = sum(torch.linalg.vector_norm(p.U[..., 0], dim=-1) ** 2 for p in ins)
            if lp.experts_in is not None:
                usq = usq + (lp.experts_in.U ** 2).sum((-1, -2, -3))
            d_in = usq.sqrt() * vnorm
            z_min = float(torch.where(vm, 1 / vnorm.clamp_min(1e-300), torch.full_like(vnorm, float("inf"))).min())
            scale_max = None
            if lp.out_weight is not None:
                kind, d_out = "weight", lp.out_weight.norm()
            elif lp.experts_out is not None:
                kind, d_out = "experts", lp.experts_out.norm().pow(2).sum(-1).sqrt()
            elif lp.out_bias is not None:
                kind, d_out = "bias", torch.linalg.vector_norm(lp.out_bias, dim=-1)
            else:
                kind, d_out = "scale", torch.linalg.vector_norm(lp.out_scale, dim=-1)
            row = {"layer": layer, "dW_in": tokmax(d_in), "dW_in_rel": None, "out": kind, "d_out": tokmax(d_out),
                   "d_out_rel": None, "scale_max": None, "z_norm_min": z_min}
            if wn[layer].get("in"):
                row["dW_in_rel"] = row["dW_in"] / wn[layer]["in"]
            if kind in ("weight", "experts") and wn[layer].get("out"):
                row["d_out_rel"] = row["d_out"] / wn[layer]["out"]
            if lp.out_scale is not None:
                scale_max = tokmax(lp.out_scale.abs().amax(-1))
                row["scale_max"] = scale_max
                if kind == "weight":  # stable variant: report the scale remainder too
                    row["out"] = "weight+scale"
                elif wn[layer].get("scale"):
                    row["d_out_rel"] = row["d_out"] / wn[layer]["scale"]
            rows.append(row)
        return rows

    # --- apply ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PatchFileError` unless ``model`` is the model these patches were extracted from."""
        check_same_model(self.meta.config_hash, self.meta.weight_fingerprint, model,
                         model_name=self.meta.model_name, what="these patches")
        if len(get_adapter(model).resolve(model)) != self.num_layers:
            raise PatchFileError(f"these patches cover {self.num_layers} layers, the model has a different count")

    @contextmanager
    def applied(self, model: nn.Module):
        """Context manager: while active, ``model(query_ids, position_ids=...)`` runs with the patches as side
        paths. The model's parameters are never modified; the hooks are removed on exit."""
        self.check_model(model)
        with PatchSession(model, get_adapter(model), self.meta.slot, layers=self.layers):
            yield model

    def run(self, model: nn.Module, **model_kwargs) -> Tensor:
        """The patched context-free output at the kept tokens: (B, T_q, vocab) logits or (B, T_q, d) states."""
        dev = next(model.parameters()).device
        mask = self.attention_mask
        with self.applied(model):
            out = run_model(model, get_adapter(model), self.query_ids.to(dev),
                            position_ids=self.position_ids.to(dev),
                            attention_mask=None if mask is None else mask.to(dev), **model_kwargs)
        return model_output(out)

    # --- save / load ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``patches.safetensors`` + ``patches.json`` into ``directory`` (atomic); returns the directory."""
        extra = {k: getattr(self, k) for k in _BLOCK_KEYS}
        return save_patch_dir(directory, _NAME, _FORMAT, self.layers, self.meta, extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None) -> ContextPatches:
        """Read patches written by :meth:`save`; :class:`PatchFileError` on any missing, damaged or edited file."""
        layers, extra, meta = load_patch_dir(directory, _NAME, _FORMAT, what="patch", device=device)
        if meta.kind != "token":
            raise PatchFileError(f"{directory}: holds {meta.kind} patches, not the per-token patches of extract()")
        if sorted(extra) != sorted(_BLOCK_KEYS):
            raise PatchFileError(f"{directory}: expected the tensors {sorted(_BLOCK_KEYS)}, found {sorted(extra)}")
        B, Tq = extra["query_ids"].shape if extra["query_ids"].dim() == 2 else (0, 0)
        for k in _BLOCK_KEYS[:4]:
            if tuple(extra[k].shape) != (B, Tq):
                raise PatchFileError(f"{directory}: tensor {k} has shape {tuple(extra[k].shape)}, expected {(B, Tq)}")
        for i, lp in enumerate(layers):
            for name, t in lp.tensors().items():
                if tuple(t.shape[:2]) != (B, Tq):
                    raise PatchFileError(f"{directory}: layer {i} {name} has shape {tuple(t.shape)}, not per token "
                                         f"({B}, {Tq}, ...)")
        return cls(layers, *(extra[k] for k in _BLOCK_KEYS), meta=meta)
