"""``StaticPatches``: a query-independent adapter for one fixed context (fitted by :func:`fit_static`).

One :class:`~contextpatch.engine.LayerPatch` per block with NO token dimensions (nn.Linear orientation,
ΔW = U Vᵀ: U (d_out, r), V (d_in, r)): ``inputs`` for every matrix reading the MLP input z, and the output slot
(``out_bias`` (d,), ``out_weight`` (d, r)/(d_g, r), or ``out_scale`` (d,) for Gemma-2/3's post-FF norm).

``applied(model)`` adds them to EVERY token of ANY input as side paths ``y ← y + (x V) Uᵀ`` (+ Δb, + Δs ⊙ u),
computed in the compute dtype (≥ float32) and never materialising W + ΔW; the weights are untouched.
``applied(model, dense=True)`` instead runs each patched module's own forward on W + ΔW, computed once on entry
(the values ``merge`` writes): the speed of a merged model, one extra copy of each patched matrix in memory, and
the parameters still untouched (the module's ``forward`` is overridden while active and restored on exit). Files:
``static.safetensors`` + ``static.json`` (the format of ``_files.py``); a wrong model or a damaged or edited file
raises :class:`PatchFileError`.
"""

from __future__ import annotations

import copy
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
from ._attention_slot import attention_modules
from ._export import merge, merged_tensors, save_merged, to_peft
from ._files import load_patch_dir, save_patch_dir
from ._identity import check_same_model
from ._model import compute_dtype, norm_eps, rms_unit
from ._records import LayerPatch, PatchMeta, side_path

__all__ = ["StaticPatches", "static_hooks"]

FORMAT, _NAME = "contextpatch-static", "static"
_ATTN = "\0attention"          # hook key of the attention-output patch (never a module path)


def static_hooks(model: nn.Module, layers: list[LayerPatch], slot: str, attention: str | None = None) -> list:
    """Forward hooks adding the static patches of ``layers`` to every token; returns the handles.

    Patches are looked up at call time, so a record filled during a forward pass (the fit) applies from then on.
    ``attention``: the block-relative path of the attention output projection carrying ``attn_out`` (or None).
    """
    cd = compute_dtype(next(model.parameters()).dtype)
    handles = []

    def lowrank(lp: LayerPatch, name: str | None):
        cache: dict = {}    # (id, tensor versions, device) of the patch -> (patch, V, Uᵀ) in the compute dtype

        def hook(mod, args, out):
            p = lp.out_weight if name is None else lp.attn_out if name == _ATTN else lp.inputs.get(name)
            if p is None:
                return out
            x = args[0]
            if p.U.dim() != 2 or x.dtype != cd or out.dtype != cd:
                return out + side_path(p, x, cd).to(out.dtype)
            key = (id(p), p.U._version, p.V._version, x.device)
            if key not in cache:      # fast path (generation): one matmul and one fused add per call
                cache.clear()
                cache[key] = (p, p.V.to(device=x.device, dtype=cd), p.U.to(device=x.device, dtype=cd).T.contiguous())
            _, V, Ut = cache[key]
            return torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]) @ V, Ut).view(out.shape)
        return hook

    def bias(lp: LayerPatch):
        def hook(mod, args, out):
            return out if lp.out_bias is None else out + lp.out_bias.to(device=out.device, dtype=out.dtype)
        return hook

    def scale(lp: LayerPatch, eps: float):
        def hook(mod, args, out):
            if lp.out_scale is None:
                return out
            u = rms_unit(args[0].to(cd), eps)
            return out + (lp.out_scale.to(device=u.device, dtype=cd) * u).to(out.dtype)
        return hook

    def add(mod: nn.Module, fn) -> None:
        handles.append(mod.register_forward_hook(fn))

    if attention is not None:
        for mod, lp in zip(attention_modules(model, attention), layers, strict=True):
            add(mod, lowrank(lp, _ATTN))
    for b, lp in zip(get_adapter(model).resolve(model), layers, strict=True):
        for name, mod in b.inputs.items():
            add(mod, lowrank(lp, name))
        if slot == "bias":
            add(b.output, bias(lp))
        elif slot == "weight":
            add(b.output, lowrank(lp, None))
        elif slot == "scale":
            add(b.scale_norm, scale(lp, norm_eps(b.scale_norm)))
    return handles


class _DenseForward:
    """``mod.forward`` ← the forward of a shallow copy of ``mod`` whose changed parameters hold their merged values:
    the module runs its own code (nn.Linear, Conv1D, a norm) on W + ΔW, with no per-call cost beyond it.
    Hooks of ``mod`` still run; its parameters and ``state_dict`` are untouched. ``remove()`` restores ``forward``."""

    def __init__(self, mod: nn.Module, values: dict[str, Tensor]):
        twin = copy.copy(mod)
        merged = {k: nn.Parameter(v, requires_grad=False) for k, v in values.items()}
        twin.__dict__["_parameters"] = {**mod._parameters, **merged}
        self.mod = mod
        mod.forward = twin.forward

    def remove(self) -> None:
        self.mod.__dict__.pop("forward", None)


def dense_overrides(model: nn.Module, layers: list[LayerPatch], meta: PatchMeta) -> list | None:
    """:class:`_DenseForward` handles for every patched module, or None (nothing overridden) when one of them has
    its ``forward`` overridden already (an enclosing ``applied(dense=True)``, accelerate's offload hooks): the
    caller then falls back to side paths."""
    by_module: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
    for mod, name, value in merged_tensors(layers, meta, model):
        by_module.setdefault(id(mod), (mod, {}))[1][name] = value
    if any("forward" in mod.__dict__ for mod, _ in by_module.values()):
        return None
    handles: list[_DenseForward] = []
    try:
        for mod, values in by_module.values():
            handles.append(_DenseForward(mod, values))
    except BaseException:
        for h in handles:           # nothing half-applied
            h.remove()
        raise
    return handles


@dataclass
class StaticPatches:
    """Query-independent patches of one context: one :class:`LayerPatch` per block (module docstring) and a
    :class:`PatchMeta` whose ``options`` hold the context ids, calibration size, ridge, rank and seed."""

    layers: list[LayerPatch]
    meta: PatchMeta

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def slot(self) -> str:
        return self.meta.slot

    @property
    def attention_module(self) -> str | None:
        """Block-relative path of the attention output projection patched (``attention=True``), else None."""
        return self.meta.options.get("attention_module") if self.meta.options.get("attention") else None

    @property
    def context_ids(self) -> Tensor:
        return torch.tensor(self.meta.options["context_ids"], dtype=torch.long)

    def to(self, device) -> StaticPatches:
        return StaticPatches([lp.map(lambda t: t.to(device)) for lp in self.layers], self.meta)

    def nbytes(self) -> int:
        """Bytes held by all factors and vectors."""
        return sum(lp.nbytes() for lp in self.layers)

    # --- typed views / summary ------------------------------------------------------------
    def layer_patches(self, layer: int) -> dict[str, LowRankPatch | VectorPatch | ScalePatch]:
        """Layer ``layer`` as typed patches keyed by module path (matrices in nn.Linear orientation)."""
        return self.layers[layer].by_module(self.meta.output_module, self.meta.scale_module, self.attention_module)

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: ‖ΔW_in‖_F (all input matrices), its size relative to ‖W_in‖, the largest input rank, the
        output slot, ‖Δb‖ / ‖ΔW_out‖_F / ‖Δs‖ (relative to ‖W_out‖ or ‖s‖ where known), the output rank and
        ‖ΔW_o‖_F of the attention-output patch (None without one)."""
        rows = []
        norms = self.meta.weight_norms or [{}] * self.num_layers
        for i in range(self.num_layers):
            typed = self.layer_patches(i)
            ins = [p for k, p in typed.items() if k in self.meta.input_modules]
            d_in = float(sum(float(p.norm()) ** 2 for p in ins) ** 0.5)
            attn = typed.pop(self.attention_module, None) if self.attention_module else None
            out = next(p for k, p in typed.items() if k not in self.meta.input_modules)
            d_out = float(out.norm())
            ref_out = norms[i].get("scale" if self.slot == "scale" else "out")
            rows.append({"layer": i, "dW_in": d_in, "dW_in_rel": d_in / norms[i]["in"] if norms[i].get("in") else None,
                         "rank_in": max(p.rank for p in ins), "out": self.slot, "d_out": d_out,
                         "d_out_rel": d_out / ref_out if ref_out and self.slot != "bias" else None,
                         "rank_out": out.rank if isinstance(out, LowRankPatch) else None,
                         "dW_attn": float(attn.norm()) if attn is not None else None})
        return rows

    # --- apply ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module, *, weights: bool = True) -> None:
        """Raise :class:`PatchFileError` unless ``model`` is the model these patches were fitted on (same config
        and layer count; ``weights``: also the fingerprint of every parameter)."""
        check_same_model(self.meta.config_hash, self.meta.weight_fingerprint, model, model_name=self.meta.model_name,
                         what="the patches of this static adapter", weights=weights)
        if len(get_adapter(model).resolve(model)) != self.num_layers:
            raise PatchFileError(f"this static adapter covers {self.num_layers} layers, the model has another count")

    @contextmanager
    def applied(self, model: nn.Module, *, dense: bool = False, check_weights: bool = True):
        """While active, every forward pass of ``model`` (any tokens, batch size, length) runs with the static
        patches. ``dense=False``: as side paths ``y + (x V) Uᵀ`` (hooks; no extra weight memory). ``dense=True``:
        each patched module runs on W + ΔW computed once on entry (the merged model's values and speed; one copy
        of each patched matrix; side paths instead where a module's forward is already overridden; for inference:
        the patched modules' own parameters get no gradient while it is active). The parameters are never
        modified; everything is removed on exit. Entry checks the model's config and weight fingerprint (every
        parameter is read once: ~6 ms on a 1M-parameter model, linear in its size); ``check_weights=False`` skips
        the fingerprint, for a caller that enters often and knows the weights are the fitted ones (the config and
        layer count are still checked)."""
        self.check_model(model, weights=check_weights)
        handles = dense_overrides(model, self.layers, self.meta) if dense else None
        if handles is None:
            handles = static_hooks(model, self.layers, self.slot, self.attention_module)
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    # --- exports -------------------------------------------------------------------------
    def to_peft(self, model: nn.Module, directory: str | os.PathLike, *, force: bool = False) -> Path:
        """Write a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``peft.PeftModel.from_pretrained(model, directory)`` loads: A = Vᵀ, B = U, α = r per module, the bias
        slot as ``lora_B`` bias. The Gemma-2/3 norm-scale slot has no LoRA form (use :meth:`save_merged`)."""
        self.check_model(model)
        return to_peft(self.layers, self.meta, model, directory, force=force)

    def merge(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """The model with the adapter folded into its weights, biases and norm gains (a copy unless ``inplace``)."""
        self.check_model(model)
        return merge(self.layers, self.meta, model, inplace=inplace)

    def save_merged(self, model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
                    force: bool = False) -> Path:
        """A standalone HF checkpoint of the merged model (``save_pretrained``; ``AutoModel*.from_pretrained``
        loads it), written atomically."""
        self.check_model(model)
        return save_merged(self.layers, self.meta, model, directory, tokenizer=tokenizer, force=force)

    # --- save / load ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``static.safetensors`` + ``static.json`` into ``directory`` (atomic); returns the directory."""
        return save_patch_dir(directory, _NAME, FORMAT, self.layers, self.meta)

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None) -> StaticPatches:
        """Read an adapter written by :meth:`save`; :class:`PatchFileError` on any missing or damaged file."""
        layers, extra, meta = load_patch_dir(directory, _NAME, FORMAT, what="static adapter", device=device)
        if meta.kind != "static" or extra:
            raise PatchFileError(f"{directory}: not a static adapter (kind {meta.kind!r})")
        for i, lp in enumerate(layers):
            if any(t.dim() > 2 for t in lp.tensors().values()):
                raise PatchFileError(f"{directory}: layer {i} has per-token factors, not a static adapter's")
        return cls(layers, meta)
