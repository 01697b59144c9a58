"""Step 2 — the context-free pass, patched layer by layer (Goldwaser et al. Algorithm 1, self-correcting).

In block ℓ the hooks see the *patched* context-free vectors (z, r) — everything upstream is already patched —
and build the block's patches against the cached with-context targets (z_C, r_C):

    input side   ΔW_m = W_m (z_C − z) zᵀ/‖z‖²   for every matrix W_m reading z   => W_m z ↦ W_m z_C
    output side  δ = r_C − r absorbed by the slot (bias Δb = δ; weight δ gᵀ/‖g‖²; scale δ ⊘ u; MoE)

so the block output equals the with-context one, and block ℓ+1 starts from it. Patches are never
materialised: every hook adds a side path ``y ← y + U (Vᵀ x)`` computed in the compute dtype (≥ float32)
on the hooked tensor's device. Per layer the factors are named (leading dims (B, T_q)):

    "in.V"                 z/‖z‖²              (d_z)       shared right factor of every input patch
    "in.U.<path>"          W_m (z_C − z)       (d_out)     one per input matrix
    "out.bias"             δ                   (d)         bias slot
    "out.U", "out.V"       δ, g/‖g‖²           (d), (d_g)  weight slot (stable variant: ρ y* − y, g/‖g‖²)
    "out.scale"            Δs                  (d)         scale slot: out += Δs ⊙ u,  u = x/rms(x)
    "router.U", "experts.gate_up.U", "experts.down.U", "experts.down.V"   MoE (see ``_moe.py``)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError, DegenerateNormError
from ..adapters import FamilyAdapter, get_adapter
from ..theory import input_patch, output_weight_patch, scale_patch
from . import _moe
from ._capture import Targets
from ._common import (
    accepts,
    check_model,
    compute_dtype,
    explicit_mask,
    first_arg,
    first_out,
    forward_kwargs,
    model_output,
)

__all__ = ["PatchSession", "PatchedResult", "patched_pass", "resolve_slot", "side"]


def side(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """Rank-1 side path per token: U (Vᵀ x) for U: (..., d_out), V, x: (..., d_in) -> (..., d_out)."""
    return U * (V * x.to(V.dtype)).sum(-1, keepdim=True)


def _rms_unit(y: Tensor, eps: float) -> Tensor:
    """u = y / sqrt(mean(y²) + eps): the unscaled RMS-normalised vector."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def _unit_rms_fit(gamma: Tensor, s: Tensor, iters: int = 200) -> Tensor:
    """y* = argmin_{mean(y²)=1} ‖s ⊙ y − γ‖²  (extensions.md §1.3; trust-region, bisection on μ).

    y = s γ / (s² − μ) with μ < min s² solving mean(s²γ²/(s² − μ)²) = 1; in the "hard case" (no root below
    min s²) μ = min s² and the missing norm is put on the argmin coordinates.
    """
    s2 = s * s
    m = s2.min()
    num = (s * gamma) ** 2
    lo = (m - num.mean(-1, keepdim=True).sqrt() - 1e-12).expand(gamma.shape[:-1] + (1,)).clone()
    hi = m.expand_as(lo).clone()
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = (num / (s2 - mid) ** 2).mean(-1, keepdim=True) > 1
        hi = torch.where(big, mid, hi)
        lo = torch.where(big, lo, mid)
    y = s * gamma / (s2 - lo)
    deficit = (1 - y.pow(2).mean(-1, keepdim=True)).clamp_min(0)
    J = (s2 == m)
    fill = torch.sqrt(deficit * s.shape[-1] / J.sum())
    return torch.where(J & (deficit > 1e-3), y + fill, y)


def resolve_slot(adapter: FamilyAdapter, model: nn.Module, output_patch: str = "auto", stable: bool = False) -> str:
    """The output-slot variant: "bias" | "weight" | "scale" | "stable" | "moe"."""
    kind = adapter.slot_kind
    if output_patch not in ("auto", "bias", "weight", "scale"):
        raise ContextPatchError(f"output_patch must be auto, bias, weight or scale, got {output_patch!r}")
    if kind in ("scale", "moe"):
        if output_patch not in ("auto", kind if kind == "scale" else "auto"):
            raise ContextPatchError(f"{adapter.name}: only the {kind} output patch is exact for this family "
                                    f"(got output_patch={output_patch!r})")
        return ("stable" if stable else "scale") if kind == "scale" else "moe"
    if stable:
        raise ContextPatchError(f"stable=True applies to Gemma-2/3 post-norm blocks, not {adapter.name}")
    if output_patch == "scale":
        raise ContextPatchError(f"{adapter.name} has no post-MLP norm: use output_patch bias or weight")
    out = adapter.resolve(model)[0].output
    has_bias = getattr(out, "bias", None) is not None
    if output_patch == "bias" and not has_bias:
        raise ContextPatchError(f"{adapter.name}: the MLP output matrix has no bias; use output_patch='weight'")
    if output_patch == "auto":
        return "bias" if has_bias else "weight"
    return output_patch


def _weight(mod: nn.Module, conv1d: bool) -> Tensor:
    """Weight in nn.Linear orientation (d_out, d_in) (Conv1D stores (d_in, d_out))."""
    return mod.weight.T if conv1d else mod.weight


def _eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ContextPatchError(f"cannot find the epsilon of {type(norm).__name__}")


class PatchSession:
    """Forward hooks on one model that apply per-token patches, computing them first in extraction mode.

    Extraction mode: ``targets`` given (and ``valid``: (B, T_q) bool, False on padding slots).
    Apply mode: ``layers`` given (per-layer dicts of stored factors, see module docstring).
    Use as a context manager; the model's parameters are never modified.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, slot: str, *, targets: Targets | None = None,
                 layers: list[dict[str, Tensor]] | None = None, valid: Tensor | None = None,
                 tol: float | None = None):
        if (targets is None) == (layers is None):
            raise ContextPatchError("PatchSession needs exactly one of targets (extract) or layers (apply)")
        self.model, self.adapter, self.slot, self.tol = model, adapter, slot, tol
        self.blocks = adapter.resolve(model)
        self.cd = compute_dtype(next(model.parameters()).dtype)
        self.targets = targets
        if targets is not None and len(targets) != len(self.blocks):
            raise ContextPatchError(f"targets cover {len(targets)} layers, the model has {len(self.blocks)}")
        if layers is not None and len(layers) != len(self.blocks):
            raise ContextPatchError(f"patches cover {len(layers)} layers, the model has {len(self.blocks)}")
        self.extracting = targets is not None
        self.valid = valid
        n = len(self.blocks)
        self.layers: list[dict[str, Tensor]] = ([dict(d) for d in layers] if layers is not None
                                                else [{} for _ in range(n)])
        self.r: list[Tensor | None] = [None] * n
        self.h: list[Tensor | None] = [None] * n
        self.delta: list[Tensor | None] = [None] * n
        self.gamma: list[Tensor | None] = [None] * n
        self._handles: list = []
        self._overrides: list = []

    # --- helpers -------------------------------------------------------------------------
    def get(self, i: int, key: str, like: Tensor) -> Tensor:
        t = self.layers[i][key]
        return t.to(device=like.device, dtype=self.cd)

    def vmask(self, like: Tensor) -> Tensor:
        """(B, T, 1) validity mask on like's device (all True when not given)."""
        if self.valid is None:
            return torch.ones(like.shape[:-1] + (1,), dtype=torch.bool, device=like.device)
        return self.valid.to(like.device).unsqueeze(-1)

    def _layer_err(self, i: int, e: DegenerateNormError) -> DegenerateNormError:
        return DegenerateNormError(f"layer {i}: {e}")

    # --- extraction: inputs ----------------------------------------------------------------
    def compute_inputs(self, b, z: Tensor) -> None:
        """At the MLP input: rank-1 input patches from (z, z_C) and δ = r_C − r."""
        i, cd = b.index, self.cd
        z = z.to(cd)
        vm = self.vmask(z)
        zc = self.targets.z[i].to(device=z.device, dtype=cd)
        if zc.shape != z.shape:
            raise ContextPatchError(f"layer {i}: target z_C has shape {tuple(zc.shape)}, context-free z "
                                    f"{tuple(z.shape)}")
        if not bool(torch.where(vm, zc, 0).isfinite().all()):
            raise ContextPatchError(f"layer {i}: the with-context targets contain NaN/inf (the with-context pass "
                                    "itself overflowed; e.g. HF float64 eager attention with left padding)")
        z_s = torch.where(vm, z, torch.ones_like(z))
        zc_s = torch.where(vm, zc, z_s)
        P = self.layers[i]
        try:
            V = None
            mats = dict(b.inputs)
            if b.router is not None:
                mats["router"] = b.router
            for name, mod in mats.items():
                p = input_patch(_weight(mod, self.adapter.conv1d).to(cd), zc_s, z_s, tol=self.tol)
                P[("in.U." + name) if name != "router" else "router.U"] = p.U[..., 0] * vm
                V = p.V[..., 0]
        except DegenerateNormError as e:
            raise self._layer_err(i, e) from None
        if b.experts is not None:
            P["experts.gate_up.U"] = torch.einsum("eoh,...h->...eo", b.experts.gate_up_proj.to(cd), zc_s - z_s) \
                * vm.unsqueeze(-1)
        P["in.V"] = V * vm
        r = z if b.residual_kind == "mlp" else self.r[i]
        rc = self.targets.r[i].to(device=r.device, dtype=cd)
        self.delta[i] = torch.where(vm, rc - r.to(cd), torch.zeros_like(rc))
        if self.slot == "bias":
            P["out.bias"] = self.delta[i]

    # --- hook factories ------------------------------------------------------------------
    def _store(self, store: list, i: int):
        def hook(mod, args, kwargs):
            store[i] = first_arg(args, kwargs).to(self.cd)
        return hook

    def _install(self) -> None:
        H = self._handles
        for b in self.blocks:
            i = b.index
            if self.extracting:
                if b.residual_kind == "norm":
                    H.append(b.residual_module.register_forward_pre_hook(self._store(self.r, i), with_kwargs=True))
                elif b.residual_kind == "parallel":
                    H.append(b.block.register_forward_pre_hook(self._store(self.h, i), with_kwargs=True))

                    def attn(mod, args, out, i=i):
                        self.r[i] = self.h[i] + first_out(out).to(self.cd)
                    H.append(b.residual_module.register_forward_hook(attn))

                def mlp_pre(mod, args, kwargs, b=b):
                    self.compute_inputs(b, first_arg(args, kwargs))
                H.append(b.mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True))
            for name, mod in b.inputs.items():
                def in_hook(mod, args, out, i=i, key="in.U." + name):
                    x = args[0]
                    return out + side(self.get(i, key, x), self.get(i, "in.V", x), x).to(out.dtype)
                H.append(mod.register_forward_hook(in_hook))
            if self.slot == "moe":
                H.append(b.router.register_forward_hook(_moe.router_hook(self, b)))
                self._overrides.append(_moe.override_experts(self, b))
            elif self.slot == "bias":
                def bias_hook(mod, args, out, i=i):
                    return out + self.get(i, "out.bias", out).to(out.dtype)
                H.append(b.output.register_forward_hook(bias_hook))
            elif self.slot in ("weight", "stable"):
                H.append(b.output.register_forward_hook(self._out_weight_hook(b)))
            if self.slot in ("scale", "stable"):
                H.append(b.scale_norm.register_forward_hook(self._scale_hook(b)))

    def _out_weight_hook(self, b):
        i = b.index

        def hook(mod, args, out):
            g = args[0]
            if self.extracting:
                gc = g.to(self.cd)
                vm = self.vmask(gc)
                g_s = torch.where(vm, gc, torch.ones_like(gc))
                if self.slot == "weight":
                    U = self.delta[i]
                else:  # stable variant: target the least-squares unit-RMS pre-norm vector ρ y*
                    y = out.to(self.cd)
                    norm = b.scale_norm
                    s = self.adapter.scale_offset + norm.weight.to(device=y.device, dtype=self.cd)
                    # γ = δ + N(y): the post-norm output to reach, N evaluated by the norm module itself
                    # (``forward`` directly: no hooks) so HF's float32 islands are matched exactly
                    gamma = self.delta[i] + norm.forward(out).to(self.cd)
                    rho = y.pow(2).mean(-1, keepdim=True).sqrt()
                    U = torch.where(vm, rho * _unit_rms_fit(gamma, s) - y, torch.zeros_like(y))
                    self.gamma[i] = gamma
                try:
                    p = output_weight_patch(U, g_s, tol=self.tol)
                except DegenerateNormError as e:
                    raise self._layer_err(i, e) from None
                self.layers[i]["out.U"] = U
                self.layers[i]["out.V"] = p.V[..., 0] * vm
            return out + side(self.get(i, "out.U", g), self.get(i, "out.V", g), g).to(out.dtype)
        return hook

    def _scale_hook(self, b):
        i, eps = b.index, _eps(b.scale_norm)

        def hook(mod, args, out):
            u = _rms_unit(args[0].to(self.cd), eps)
            if self.extracting:
                vm = self.vmask(u)
                u_s = torch.where(vm, u, torch.ones_like(u))
                # naive: Δs = δ ⊘ u ;  stable: remainder Δs = (γ − N(y')) ⊘ u'  (N(y') = this norm's output)
                num = self.delta[i] if self.slot == "scale" else self.gamma[i] - out.to(self.cd)
                try:
                    ds = scale_patch(torch.where(vm, num, torch.zeros_like(num)), u_s, tol=self.tol).delta
                except DegenerateNormError as e:
                    raise self._layer_err(i, e) from None
                self.layers[i]["out.scale"] = ds
            return out + (self.get(i, "out.scale", u) * u).to(out.dtype)
        return hook

    # --- context manager ------------------------------------------------------------------
    def __enter__(self) -> PatchSession:
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for restore in self._overrides:
            restore()
        self._handles.clear()
        self._overrides.clear()
        self.r = [None] * len(self.blocks)
        self.h = [None] * len(self.blocks)


@dataclass
class PatchedResult:
    output: Tensor                       # (B, T_q, V) logits or (B, T_q, d) hidden states, compute dtype
    layers: list[dict[str, Tensor]]      # per-layer factors (see module docstring)
    slot: str
    past_key_values: object = None


def run_model(model: nn.Module, adapter: FamilyAdapter, input_ids: Tensor, *, position_ids=None,
              attention_mask=None, past_key_values=None, use_cache=False, **model_kwargs):
    kw = forward_kwargs(model, causal=adapter.causal, use_cache=use_cache, past_key_values=past_key_values)
    if adapter.causal and accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 0
    with torch.no_grad():
        mask = explicit_mask(input_ids, attention_mask, position_ids, past_key_values)
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kw,
                     **model_kwargs)


def patched_pass(model: nn.Module, input_ids: Tensor, targets: Targets, *, adapter: FamilyAdapter | None = None,
                 valid: Tensor | None = None, position_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, past_key_values=None, use_cache: bool = False,
                 output_patch: str = "auto", stable: bool = False, tol: float | None = None,
                 **model_kwargs) -> PatchedResult:
    """Run the context-free tokens ``input_ids`` (B, T_q), computing and applying each layer's patches on the fly.

    ``targets`` must hold (B, T_q, ·) vectors aligned with ``input_ids`` (see :func:`capture_targets`).
    With ``past_key_values`` (a context-free cache of earlier, already patched tokens) only the new tokens run.
    """
    check_model(model)
    adapter = adapter or get_adapter(model)
    slot = resolve_slot(adapter, model, output_patch, stable)
    if input_ids.dim() != 2:
        raise ContextPatchError(f"input_ids must be (B, T_q), got shape {tuple(input_ids.shape)}")
    if targets.z and tuple(targets.z[0].shape[:2]) != tuple(input_ids.shape):
        raise ContextPatchError(f"targets are for {tuple(targets.z[0].shape[:2])} tokens, input_ids has shape "
                                f"{tuple(input_ids.shape)}")
    with PatchSession(model, adapter, slot, targets=targets, valid=valid, tol=tol) as sess:
        out = run_model(model, adapter, input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        past_key_values=past_key_values, use_cache=use_cache, **model_kwargs)
    layers = [_moe.finalize(d, input_ids.shape) for d in sess.layers]
    return PatchedResult(model_output(out).to(sess.cd), layers, slot, getattr(out, "past_key_values", None))


@contextmanager
def applied_session(model: nn.Module, adapter: FamilyAdapter, slot: str, layers: list[dict[str, Tensor]]):
    """Apply stored factors (apply mode) for the duration of the block."""
    with PatchSession(model, adapter, slot, layers=layers):
        yield model
