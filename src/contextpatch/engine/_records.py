"""The two typed records every patch object is made of: one :class:`LayerPatch` per block, one :class:`PatchMeta`.

Both :class:`~contextpatch.engine.ContextPatches` (per-token, exact) and
:class:`~contextpatch.engine.StaticPatches` (query-independent adapters) hold ``list[LayerPatch]`` + ``PatchMeta``
and share one file format (``_files.py``) with one tensor naming scheme:

    layer.<ℓ>.in.<path>.U / .V       ΔW_m = U Vᵀ for every matrix W_m that reads the MLP input z
    layer.<ℓ>.out.bias               Δb (bias slot)
    layer.<ℓ>.out.weight.U / .V      ΔW_out (weight slot, and the stable variant's rank-1 part)
    layer.<ℓ>.out.scale              Δs (post-FF norm gain, scale slot and the stable variant's remainder)
    layer.<ℓ>.attn.out.U / .V        ΔW_o on the attention output projection (static adapters, attention=True)
    layer.<ℓ>.router.U / .V          MoE router
    layer.<ℓ>.experts_in.U / .V      every expert's gate_up_proj  (…, E, 2I, r), (…, E, d, r)
    layer.<ℓ>.experts_out.U / .V     each active expert's down_proj (…, E, d, r), (…, E, I, r)

Matrix patches use the ``nn.Linear`` orientation ΔW: (d_out, d_in) (GPT-2's Conv1D weight gets ΔWᵀ).
The leading dims "…" are (B, T_q) for per-token patches and () for static ones. Theory: docs/theory.md §3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .._errors import ContextPatchError, PatchFileError
from .._patches import LowRankPatch, ScalePatch, VectorPatch

__all__ = ["LayerPatch", "PatchMeta", "OutputPatch", "META_VERSION", "side_path"]

META_VERSION = 2


class OutputPatch(str, Enum):
    """Which output slot absorbs the residual difference δ = r_C − r (docs/theory.md §3.1)."""

    auto = "auto"        # bias if the MLP output matrix has one, else weight; Gemma-2/3: stable; Mixtral: moe
    bias = "bias"        # Δb = δ
    weight = "weight"    # ΔW_out = δ gᵀ/‖g‖²
    scale = "scale"      # Gemma-2/3 post-FF norm gain Δs = δ ⊘ u (ill-conditioned when some |u_j| is small)
    stable = "stable"    # Gemma-2/3: rank-1 down_proj to the nearest reachable state + a small scale remainder
    moe = "moe"          # Mixtral: router + experts


_SLOTS = {s.value for s in OutputPatch} - {"auto"}


@dataclass
class LayerPatch:
    """One block's patches (see the module docstring for shapes). Unused slots are None."""

    inputs: dict[str, LowRankPatch] = field(default_factory=dict)
    out_bias: Tensor | None = None
    out_weight: LowRankPatch | None = None
    out_scale: Tensor | None = None
    router: LowRankPatch | None = None
    experts_in: LowRankPatch | None = None
    experts_out: LowRankPatch | None = None
    attn_out: LowRankPatch | None = None

    _LOWRANK = ("out_weight", "router", "experts_in", "experts_out", "attn_out")
    _NAMES = {"out_weight": "out.weight", "router": "router", "experts_in": "experts_in", "experts_out": "experts_out",
              "attn_out": "attn.out"}

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``name -> tensor`` (the file naming scheme, without the ``layer.<ℓ>.`` prefix)."""
        out: dict[str, Tensor] = {}
        for path, p in self.inputs.items():
            out[f"in.{path}.U"], out[f"in.{path}.V"] = p.U, p.V
        for attr in self._LOWRANK:
            p = getattr(self, attr)
            if p is not None:
                out[self._NAMES[attr] + ".U"], out[self._NAMES[attr] + ".V"] = p.U, p.V
        if self.out_bias is not None:
            out["out.bias"] = self.out_bias
        if self.out_scale is not None:
            out["out.scale"] = self.out_scale
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, where: str = "") -> LayerPatch:
        """Inverse of :meth:`tensors`; :class:`PatchFileError` on an unknown or unpaired name."""
        lp = cls()
        pairs: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            if name in ("out.bias", "out.scale"):
                setattr(lp, "out_" + name[4:], t)
                continue
            stem, _, uv = name.rpartition(".")
            if uv not in ("U", "V") or not stem:
                raise PatchFileError(f"{where}unknown patch tensor {name!r}")
            pairs.setdefault(stem, {})[uv] = t
        by_name = {v: k for k, v in cls._NAMES.items()}
        for stem, uv in pairs.items():
            if set(uv) != {"U", "V"}:
                raise PatchFileError(f"{where}patch {stem!r} has only its {''.join(uv)} factor")
            try:
                p = LowRankPatch(uv["U"], uv["V"])
            except ContextPatchError as e:
                raise PatchFileError(f"{where}patch {stem!r}: {e}") from None
            if stem.startswith("in."):
                lp.inputs[stem[3:]] = p
            elif stem in by_name:
                setattr(lp, by_name[stem], p)
            else:
                raise PatchFileError(f"{where}unknown patch {stem!r}")
        return lp

    def map(self, fn) -> LayerPatch:
        """Apply ``fn`` to every tensor (e.g. ``lambda t: t.to(device)``)."""
        lp = LayerPatch({k: LowRankPatch(fn(p.U), fn(p.V)) for k, p in self.inputs.items()})
        for attr in self._LOWRANK:
            p = getattr(self, attr)
            setattr(lp, attr, None if p is None else LowRankPatch(fn(p.U), fn(p.V)))
        lp.out_bias = None if self.out_bias is None else fn(self.out_bias)
        lp.out_scale = None if self.out_scale is None else fn(self.out_scale)
        return lp

    def by_module(self, output_module: str | None, scale_module: str | None,
                  attention_module: str | None = None) -> dict[str, object]:
        """The patches keyed by the module path they change (matrices as :class:`LowRankPatch`, Δb as
        :class:`VectorPatch`, Δs as :class:`ScalePatch`; MoE experts under ``experts.*``; the attention-output
        patch under ``attention_module``)."""
        out: dict[str, object] = dict(self.inputs)
        if self.attn_out is not None:
            out[attention_module or "attn.out"] = self.attn_out
        if self.router is not None:
            out.update({"router": self.router, "experts.gate_up_proj": self.experts_in,
                        "experts.down_proj": self.experts_out})
        if self.out_weight is not None:
            out[output_module] = self.out_weight
        if self.out_bias is not None:
            out[f"{output_module}.bias"] = VectorPatch(self.out_bias)
        if self.out_scale is not None:
            out[f"{scale_module}.weight"] = ScalePatch(self.out_scale)
        return out

    def nbytes(self) -> int:
        """Bytes held (a factor shared by several input patches is counted once)."""
        seen, n = set(), 0
        for t in self.tensors().values():
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                n += t.numel() * t.element_size()
        return n


def side_path(p: LowRankPatch, x: Tensor, dtype: torch.dtype) -> Tensor:
    """ΔW x = U (Vᵀ x) in ``dtype`` on x's device, for x: (B, T, d_in).

    Per-token factors (batch dims (B, T), rank 1) act elementwise; static factors (no batch dims) are shared by
    every token: (x V) Uᵀ.
    """
    U, V = p.U.to(device=x.device, dtype=dtype), p.V.to(device=x.device, dtype=dtype)
    x = x.to(dtype)
    if U.dim() == 2:
        return (x @ V) @ U.T
    if U.shape[-1] == 1:
        return U[..., 0] * (V[..., 0] * x).sum(-1, keepdim=True)
    return torch.einsum("...or,...r->...o", U, torch.einsum("...ir,...i->...r", V, x))


# --- metadata --------------------------------------------------------------------------------------------
_TYPES = {"kind": str, "family": str, "slot": str, "num_layers": int, "input_modules": list, "model_name": str,
          "model_class": str, "config_hash": str, "weight_fingerprint": str, "dtype": str, "compute_dtype": str,
          "variant": str, "weight_norms": list, "options": dict, "version": int}


@dataclass
class PatchMeta:
    """What a patch set is and which model it belongs to (versioned, validated on load).

    kind: "token" (:class:`ContextPatches`) or "static" (:class:`StaticPatches`); slot: an :class:`OutputPatch`
    value other than auto; options: the extraction/fit options (JSON values), e.g. ``bos_is_context``, and for
    static adapters ``context_ids``, ``ridge``, ``rank``, ``seed``; shared-context passes add ``shared_context``.
    """

    kind: str
    family: str
    slot: str
    num_layers: int
    input_modules: list[str]
    output_module: str | None
    scale_module: str | None
    model_name: str
    model_class: str
    config_hash: str
    weight_fingerprint: str
    dtype: str
    compute_dtype: str
    variant: str = ""
    weight_norms: list[dict[str, float | None]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: int = META_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "") -> PatchMeta:
        """Validate a JSON object as metadata; :class:`PatchFileError` names the first bad field."""
        if not isinstance(d, dict):
            raise PatchFileError(f"{where}metadata must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PatchFileError(f"{where}unknown metadata field(s) {unknown}")
        required = [f.name for f in fields(cls) if f.name not in ("variant", "weight_norms", "options", "version")]
        missing = [k for k in required if k not in d]
        if missing:
            raise PatchFileError(f"{where}metadata is missing {missing}")
        for k, v in d.items():
            want = _TYPES.get(k, (str, type(None)))
            if isinstance(v, bool) and want is int or not isinstance(v, want):
                raise PatchFileError(f"{where}metadata field {k!r} has the wrong type ({type(v).__name__})")
        if d.get("version", META_VERSION) != META_VERSION:
            raise PatchFileError(f"{where}metadata version {d['version']}, this contextpatch reads {META_VERSION}")
        if d["kind"] not in ("token", "static"):
            raise PatchFileError(f"{where}metadata kind {d['kind']!r} is not 'token' or 'static'")
        if d["slot"] not in _SLOTS:
            raise PatchFileError(f"{where}metadata slot {d['slot']!r} is not one of {sorted(_SLOTS)}")
        if d["num_layers"] < 1:
            raise PatchFileError(f"{where}metadata num_layers must be ≥ 1, got {d['num_layers']}")
        if not all(isinstance(m, str) for m in d["input_modules"]):
            raise PatchFileError(f"{where}metadata input_modules must be a list of module paths")
        return cls(**d)


def check_layers(layers: list[LayerPatch], meta: PatchMeta, *, where: str = "") -> None:
    """Every layer carries exactly the patches its slot needs (a file edited by hand fails here, not in a hook)."""
    if len(layers) != meta.num_layers:
        raise PatchFileError(f"{where}{len(layers)} layers of tensors, metadata says {meta.num_layers}")
    need = {"bias": ("out_bias",), "weight": ("out_weight",), "scale": ("out_scale",),
            "stable": ("out_weight", "out_scale"), "moe": ("router", "experts_in", "experts_out")}[meta.slot]
    for i, lp in enumerate(layers):
        missing = [a for a in need if getattr(lp, a) is None]
        if missing:
            raise PatchFileError(f"{where}layer {i}: the {meta.slot!r} slot needs {missing}, not in the file")
        if (lp.attn_out is not None) != bool(meta.options.get("attention")):
            raise PatchFileError(f"{where}layer {i}: attention-output patch "
                                 f"{'present' if lp.attn_out is not None else 'missing'}, metadata attention="
                                 f"{bool(meta.options.get('attention'))}")
        if meta.slot != "moe" and sorted(lp.inputs) != sorted(meta.input_modules):
            raise PatchFileError(f"{where}layer {i}: input patches {sorted(lp.inputs)}, metadata says "
                                 f"{sorted(meta.input_modules)}")
