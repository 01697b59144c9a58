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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._errors import PatchFileError
from .._io import atomic_write_with
from .._patches import LowRankPatch, ScalePatch, VectorPatch
from ..adapters import get_adapter

__all__ = ["ContextPatches", "config_hash", "weight_fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_TENSOR_FILE, _META_FILE = "patches.safetensors", "patches.json"
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        want, got = self.meta.get("config_hash"), config_hash(model)
        if want != got:
            raise PatchFileError(f"these patches belong to a different model: config hash {want} "
                                 f"(model {self.meta.get('model_name')!r}) != {got} ({type(model).__name__})")
        want_w, got_w = self.meta.get("weight_fingerprint"), weight_fingerprint(model)
        if want_w != got_w:
            raise PatchFileError(f"these patches belong to a different model: same config but different weights "
                                 f"(fingerprint {want_w} != {got_w})")
        if len(get_adapter(model).resolve(model)) != self.num_layers:
            raise PatchFileError(f"patches cover {self.num_layers} layers, the model has a different count")

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
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{i}.{k}": v.detach().to("cpu").contiguous() for i, P in enumerate(self.layers)
                   for k, v in P.items()}
        tensors.update({k: getattr(self, k).detach().to("cpu").contiguous() for k in _BLOCK_KEYS})
        atomic_write_with(d / _TENSOR_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "contextpatch"}))
        meta = {"format_version": FORMAT_VERSION, "tensor_file": _TENSOR_FILE,
                "tensor_sha256": _sha256(d / _TENSOR_FILE), "tensors": sorted(tensors),
                "num_layers": self.num_layers, "meta": self.meta}

        def write_json(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
        atomic_write_with(d / _META_FILE, write_json)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None) -> ContextPatches:
        d = Path(directory)
        mpath, tpath = d / _META_FILE, d / _TENSOR_FILE
        for p in (mpath, tpath):
            if not p.is_file():
                raise PatchFileError(f"missing patch file {p}")
        try:
            meta = json.loads(mpath.read_text())
            names, n_layers, inner = meta["tensors"], int(meta["num_layers"]), meta["meta"]
            version, digest = meta["format_version"], meta["tensor_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise PatchFileError(f"{mpath} is not a valid contextpatch metadata file ({e})") from None
        if version != FORMAT_VERSION:
            raise PatchFileError(f"{mpath}: unsupported format version {version} (expected {FORMAT_VERSION})")
        if _sha256(tpath) != digest:
            raise PatchFileError(f"{tpath} is truncated or corrupted: its SHA-256 does not match {mpath.name}")
        try:
            tensors = load_file(str(tpath), device=str(device) if device is not None else "cpu")
        except Exception as e:  # safetensors raises several types for bad headers
            raise PatchFileError(f"{tpath} could not be read as safetensors ({e})") from None
        if sorted(tensors) != sorted(names):
            raise PatchFileError(f"{tpath} holds tensors {sorted(tensors)[:5]}..., expected {names[:5]}...")
        layers: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]
        for k, v in tensors.items():
            if k.startswith("layer."):
                _, i, key = k.split(".", 2)
                layers[int(i)][key] = v
        return cls(layers, *(tensors[k] for k in _BLOCK_KEYS), meta=inner)
