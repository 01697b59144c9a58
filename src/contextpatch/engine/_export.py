"""Exports of a static adapter into the ecosystem: a peft LoRA folder, or a merged standalone HF checkpoint.

    to_peft(layers, meta, model, dir)   adapter_config.json + adapter_model.safetensors that
                                        ``peft.PeftModel.from_pretrained(base, dir)`` loads
    merged_tensors(layers, meta, model) the merged values without touching the model (``applied(model, dense=True)``)
    merge(layers, meta, model)          W ← W + U Vᵀ (Conv1D: its transpose; MLP matrices and, with attention=True,
                                        the attention output projection), b ← b + Δb, norm gain ← gain + Δs
    save_merged(layers, meta, model, dir)   ``merge`` then ``save_pretrained`` (AutoModel*.from_pretrained loads it)

LoRA computes y = W x + B (A x) · (α / r) (+ the ``lora_B`` bias with ``lora_bias=True``). A static patch
ΔW = U Vᵀ (U: (d_out, r), V: (d_in, r)) is exactly A = Vᵀ, B = U with α = r, per module (peft's ``rank_pattern``
and ``alpha_pattern``); the bias slot Δb becomes the ``lora_B`` bias of the output matrix (zero A, B). The
post-FF norm scale of Gemma-2/3 has no LoRA form: :func:`to_peft` refuses it and names :func:`save_merged`.
Folders are written to a temporary sibling and renamed into place: nothing is half-written.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._errors import ContextPatchError
from .._io import atomic_folder
from ..adapters import get_adapter
from ._records import LayerPatch, PatchMeta

__all__ = ["to_peft", "merge", "merged_tensors", "save_merged"]


def _paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _lora_modules(layers: list[LayerPatch], meta: PatchMeta, model: nn.Module) -> dict[str, tuple]:
    """Full module path -> (A (r, d_in), B (d_out, r), bias (d_out,) or None), float32."""
    if meta.slot in ("scale", "stable"):
        raise ContextPatchError(f"{meta.family}: the post-FF norm scale patch (slot {meta.slot!r}) has no LoRA form; "
                                "export it with save_merged(model, dir) (folds Δs into the norm gain), or apply it "
                                "with static.applied(model)")
    names = _paths(model)
    out: dict[str, tuple] = {}
    for b, lp in zip(get_adapter(model).resolve(model), layers, strict=True):
        for path, p in lp.inputs.items():
            out[names[id(b.inputs[path])]] = (p.V.T.float(), p.U.float(), None)
        if lp.attn_out is not None:
            out[names[id(_attention(b, meta))]] = (lp.attn_out.V.T.float(), lp.attn_out.U.float(), None)
        if lp.out_weight is not None:
            out[names[id(b.output)]] = (lp.out_weight.V.T.float(), lp.out_weight.U.float(), None)
        if lp.out_bias is not None:
            d_out, d_in = lp.out_bias.shape[0], _in_features(b.output, meta)
            out[names[id(b.output)]] = (torch.zeros(1, d_in), torch.zeros(d_out, 1), lp.out_bias.float())
    return out


def _attention(block, meta: PatchMeta) -> nn.Module:
    """The attention output projection of a resolved block that carries ``attn_out``."""
    path = meta.options.get("attention_module")
    if not path:
        raise ContextPatchError("an attention-output patch without metadata option 'attention_module'")
    return block.block.get_submodule(path)


def _in_features(mod: nn.Module, meta: PatchMeta) -> int:
    w = mod.weight
    return w.shape[0] if meta.options.get("conv1d") else w.shape[1]


def to_peft(layers: list[LayerPatch], meta: PatchMeta, model: nn.Module, directory: str | os.PathLike, *,
            force: bool = False) -> Path:
    """Write the adapter as a peft LoRA folder; returns the folder."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ContextPatchError("exporting to peft needs the peft package: pip install 'contextpatch[peft]'") from None
    mods = _lora_modules(layers, meta, model)
    ranks = {k: A.shape[0] for k, (A, _, _) in mods.items()}
    r = max(ranks.values())
    with_bias = any(bias is not None for _, _, bias in mods.values())
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(mods), lora_dropout=0.0,
                        rank_pattern={k: v for k, v in ranks.items() if v != r},
                        alpha_pattern={k: v for k, v in ranks.items() if v != r},
                        fan_in_fan_out=bool(meta.options.get("conv1d")), lora_bias=with_bias,
                        base_model_name_or_path=meta.model_name or None)
    tensors = {}
    for k, (A, B, bias) in mods.items():
        tensors[f"base_model.model.{k}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{k}.lora_B.weight"] = B.contiguous()
        if with_bias:
            tensors[f"base_model.model.{k}.lora_B.bias"] = (bias if bias is not None else torch.zeros(B.shape[0]))
    with atomic_folder(directory, force=force) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt", "contextpatch.kind": "static", "contextpatch.family": meta.family})
    return Path(directory)


def merged_tensors(layers: list[LayerPatch], meta: PatchMeta,
                   model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, parameter name, merged value) of every parameter the adapter changes: W + ΔW (Conv1D: its
    transpose), b + Δb, gain + Δs, summed in float64 and cast to the parameter's dtype; ``model`` is not touched."""
    adapter = get_adapter(model)
    conv1d = bool(meta.options.get("conv1d"))
    deltas: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}

    def add(mod: nn.Module, name: str, delta: torch.Tensor, transpose: bool = False) -> None:
        param = getattr(mod, name)
        delta = (delta.T if transpose else delta).to(device=param.device, dtype=torch.float64)
        key = (id(mod), name)
        deltas[key] = (mod, name, deltas[key][2] + delta if key in deltas else delta)

    for b, lp in zip(adapter.resolve(model), layers, strict=True):
        for path, p in lp.inputs.items():
            add(b.inputs[path], "weight", p.dense(), conv1d)
        if lp.out_weight is not None:
            add(b.output, "weight", lp.out_weight.dense(), conv1d)
        if lp.attn_out is not None:
            add(_attention(b, meta), "weight", lp.attn_out.dense(), conv1d)
        if lp.out_bias is not None:
            add(b.output, "bias", lp.out_bias)
        if lp.out_scale is not None:
            add(b.scale_norm, "weight", lp.out_scale)      # (offset + w + Δs) ⊙ u = (offset + w) ⊙ u + Δs ⊙ u
    out = []
    with torch.no_grad():
        for mod, name, d in deltas.values():
            param = getattr(mod, name)
            out.append((mod, name, (param.double() + d).to(param.dtype)))
    return out


def merge(layers: list[LayerPatch], meta: PatchMeta, model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A model with the adapter folded into its weights (a deep copy unless ``inplace``); sums in float64."""
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for mod, name, value in merged_tensors(layers, meta, target):
            getattr(mod, name).copy_(value)
    return target


def save_merged(layers: list[LayerPatch], meta: PatchMeta, model: nn.Module, directory: str | os.PathLike, *,
                tokenizer=None, force: bool = False) -> Path:
    """``merge`` into a copy and ``save_pretrained`` it (safetensors, config, tokenizer if given); returns the
    folder."""
    merged = merge(layers, meta, model)
    with atomic_folder(directory, force=force) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(directory)
