"""``ContextPatches``: per-layer, per-token patch factors with metadata; apply, summarise, save, load.

Files (``save(dir)``): ``patches.safetensors`` (every tensor, bit-exact) and ``patches.json`` (metadata, the
SHA-256 of the tensor file, the tensor names). Both are written to a temporary file and moved into place
with ``os.replace`` (atomic). ``load`` checks the hash and the names and raises :class:`PatchFileError` on any
truncated, corrupted or inconsistent file; ``applied(model)`` raises it when the model's config hash or
weight fingerprint differs from the one the patches were extracted from.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import PatchFileError
from .._patches import LowRankPatch, ScalePatch, VectorPatch
from ..adapters import get_adapter
from ._files import check_same_model, load_patch_dir, save_patch_dir

__all__ = ["ContextPatches", "config_hash", "weight_fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAME, _FORMAT = "patches", "contextpatch"
_VOLATILE = {"transformers_version", "torch_dtype", "dtype", "architectures", "attn_implementation",
             "experts_implementation", "use_cache", "output_hidden_states", "output_attentions", "return_dict"}
_BLOCK_KEYS = ("query_ids", "position_ids", "valid", "query_index", "context_mask")


def config_hash(model_or_config) -> str:
    """SHA-256 (first 16 hex) of the architecture config, without volatile keys (dtype, paths, versions)."""
    cfg = getattr(model_or_config, "config", model_or_config).to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weight_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex) of a strided float32 sample of the first and last block's MLP input matrices."""
    adapter = get_adapter(model)
    blocks = adapter.resolve(model)
    h = hashlib.sha256()
    for b in (blocks[0], blocks[-1]):
        mod = next(iter(b.inputs.values())) if b.inputs else b.router
        w = mod.weight.detach().reshape(-1)
        step = max(1, w.numel() // 4096)
        h.update(w[::step][:4096].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ContextPatches:
    """The context of one extraction as patches, for B rows × T_q kept tokens × L layers.

    Attributes:
        layers: per layer, named factors with leading dims (B, T_q) (names in ``engine/_patched.py``).
        query_ids: (B, T_q) the kept token ids (context-free input).
        position_ids: (B, T_q) their positions in the context-free pass.
        valid: (B, T_q) bool, False on padding slots.
        query_index: (B, T_q) positions of the kept tokens in the original sequence.
        context_mask: (B, T) bool, which tokens of the original sequence were context.
        meta: family, variant, slot, model name, config hash, weight fingerprint, dtype, options, ‖W‖ per layer.
    """

    layers: list[dict[str, Tensor]]
    query_ids: Tensor
    position_ids: Tensor
    valid: Tensor
    query_index: Tensor
    context_mask: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    # --- shape ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_shape(self) -> tuple[int, int]:
        return tuple(self.query_ids.shape)

    @property
    def attention_mask(self) -> Tensor | None:
        return None if bool(self.valid.all()) else self.valid.long()

    def to(self, device) -> ContextPatches:
        return ContextPatches([{k: v.to(device) for k, v in d.items()} for d in self.layers],
                              *(getattr(self, k).to(device) for k in _BLOCK_KEYS), meta=dict(self.meta))

    # --- typed views ---------------------------------------------------------------------
    def layer_patches(self, layer: int) -> dict[str, LowRankPatch | VectorPatch | ScalePatch]:
        """Layer ``layer``'s patches as typed objects keyed by module path (batch dims (B, T_q)).

        Matrix patches use the nn.Linear orientation ΔW: (d_out, d_in) (GPT-2's Conv1D weight gets ΔWᵀ).
        MoE expert patches carry an extra expert batch dim: (B, T_q, E).
        """
        P = self.layers[layer]
        out: dict[str, LowRankPatch | VectorPatch | ScalePatch] = {}
        for k, U in P.items():
            if k.startswith("in.U."):
                out[k[5:]] = LowRankPatch.outer(U, P["in.V"])
        if "router.U" in P:
            out["router"] = LowRankPatch.outer(P["router.U"], P["in.V"])
            Ugu = P["experts.gate_up.U"]                                           # (B, T_q, E, 2I)
            Vx = P["in.V"].unsqueeze(-2).expand(Ugu.shape[:-1] + P["in.V"].shape[-1:])
            out["experts.gate_up_proj"] = LowRankPatch.outer(Ugu, Vx)
            out["experts.down_proj"] = LowRankPatch.outer(P["experts.down.U"], P["experts.down.V"])
        out_name = self.meta.get("output_module", "output")
        if "out.bias" in P:
            out[out_name + ".bias"] = VectorPatch(P["out.bias"])
        if "out.U" in P:
            out[out_name] = LowRankPatch.outer(P["out.U"], P["out.V"])
        if "out.scale" in P:
            out[self.meta.get("scale_module", "scale") + ".weight"] = ScalePatch(P["out.scale"])
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: ‖ΔW_in‖_F, ‖ΔW_in‖/‖W_in‖, the output patch norm (‖Δb‖, ‖ΔW_out‖ or ‖Δs‖) and its
        relative size, min ‖z‖; norms are the max over the valid tokens of all rows."""
        rows = []
        vm = self.valid
        wn = self.meta.get("weight_norms") or [{}] * self.num_layers

        def tokmax(x: Tensor) -> float:
            x = x.to(vm.device)
            return float(torch.where(vm, x, torch.zeros_like(x)).max())

        for layer, P in enumerate(self.layers):
            vnorm = torch.linalg.vector_norm(P["in.V"], dim=-1)
            usq = sum(torch.linalg.vector_norm(U, dim=-1) ** 2 for k, U in P.items()
                      if k.startswith("in.U.") or k == "router.U")
            if "experts.gate_up.U" in P:
                usq = usq + (P["experts.gate_up.U"] ** 2).sum((-1, -2))
            d_in = usq.sqrt() * vnorm
            z_min = float(torch.where(vm, 1 / vnorm.clamp_min(1e-300), torch.full_like(vnorm, float("inf"))).min())
            if "out.U" in P:
                kind, d_out = "weight", torch.linalg.vector_norm(P["out.U"], dim=-1) * torch.linalg.vector_norm(
                    P["out.V"], dim=-1)
            elif "experts.down.U" in P:
                kind = "experts"
                d_out = ((P["experts.down.U"] ** 2).sum(-1) * (P["experts.down.V"] ** 2).sum(-1)).sum(-1).sqrt()
            elif "out.bias" in P:
                kind, d_out = "bias", torch.linalg.vector_norm(P["out.bias"], dim=-1)
            else:
                kind, d_out = "scale", torch.linalg.vector_norm(P["out.scale"], dim=-1)
            row = {"layer": layer, "dW_in": tokmax(d_in), "dW_in_rel": None, "out": kind, "d_out": tokmax(d_out),
                   "d_out_rel": None, "scale_max": None, "z_norm_min": z_min}
            if wn[layer].get("in"):
                row["dW_in_rel"] = row["dW_in"] / wn[layer]["in"]
            if kind in ("weight", "experts") and wn[layer].get("out"):
                row["d_out_rel"] = row["d_out"] / wn[layer]["out"]
            if "out.scale" in P:
                row["scale_max"] = tokmax(P["out.scale"].abs().amax(-1))
                if kind == "weight":  # stable variant: report the scale remainder too
                    row["out"] = "weight+scale"
                elif wn[layer].get("scale"):
                    row["d_out_rel"] = row["d_out"] / wn[layer]["scale"]
            rows.append(row)
        return rows

    # --- apply ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PatchFileError` unless ``model`` is the model these patches were extracted from."""
        check_same_model(self.meta, model, self.num_layers, "these patches")

    @contextmanager
    def applied(self, model: nn.Module):
        """Context manager: while active, ``model(query_ids, position_ids=...)`` runs with the patches as side
        paths. The model's parameters are never modified; the hooks are removed on exit."""
        from ._patched import applied_session

        self.check_model(model)
        with applied_session(model, get_adapter(model), self.meta["slot"], self.layers):
            yield model

    def run(self, model: nn.Module, **model_kwargs) -> Tensor:
        """The patched context-free output at the kept tokens: (B, T_q, vocab) logits or (B, T_q, d) states."""
        from ._extract import run_patched

        return run_patched(model, self, **model_kwargs)

    # --- save / load ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``patches.safetensors`` + ``patches.json`` into ``directory`` (atomic); returns the directory."""
        extra = {k: getattr(self, k) for k in _BLOCK_KEYS}
        return save_patch_dir(directory, _NAME, _FORMAT, FORMAT_VERSION, self.layers, self.meta, extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None) -> ContextPatches:
        """Read patches written by :meth:`save`; :class:`PatchFileError` on any missing or damaged file."""
        layers, extra, meta = load_patch_dir(directory, _NAME, _FORMAT, FORMAT_VERSION, what="patch", device=device)
        if sorted(extra) != sorted(_BLOCK_KEYS):
            raise PatchFileError(f"{directory}: expected the tensors {sorted(_BLOCK_KEYS)}, found {sorted(extra)}")
        return cls(layers, *(extra[k] for k in _BLOCK_KEYS), meta=meta)
