"""Step 2 — the context-free pass, patched layer by layer (Goldwaser et al. Algorithm 1, self-correcting).

In block ℓ the hooks see the *patched* context-free vectors (z, r) — everything upstream is already patched —
and build the block's patches against the cached with-context targets (z_C, r_C) of step 1:

    input side   ΔW_m = W_m (z_C − z) zᵀ/‖z‖²   for every matrix W_m reading z   => W_m z ↦ W_m z_C
    output side  δ = r_C − r absorbed by the slot (bias Δb = δ; weight δ gᵀ/‖g‖²; scale δ ⊘ u; stable; MoE)

so the block output equals the with-context one, and block ℓ+1 starts from it (docs/theory.md §3). Patches are
never materialised: every hook adds a side path ``y ← y + U (Vᵀ x)`` computed in the compute dtype (≥ float32)
on the hooked tensor's device. Each block's patches are one :class:`~contextpatch.engine.LayerPatch` with
per-token factors (leading dims (B, T_q); rank 1; the input patches share V = z/‖z‖²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError, DegenerateNormError
from .._patches import LowRankPatch
from ..adapters import FamilyAdapter, get_adapter
from ..theory import default_tol, input_patch, output_weight_patch, scale_patch
from . import _moe
from ._model import (
    compute_dtype,
    first_arg,
    linear_weight,
    model_output,
    norm_eps,
    require_hf_model,
    rms_unit,
    run_model,
    tap_residual,
)
from ._records import LayerPatch, OutputPatch, side_path
from ._step1_capture import Targets

__all__ = ["PatchSession", "PatchedResult", "patched_pass", "resolve_slot", "unit_rms_fit"]


def unit_rms_fit(gamma: Tensor, s: Tensor, iters: int = 200) -> Tensor:
    """y* = argmin_{mean(y²)=1} ‖s ⊙ y − γ‖²  (docs/theory.md §3.2; trust region, bisection on μ).

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


def resolve_slot(adapter: FamilyAdapter, model: nn.Module, output_patch: str | OutputPatch = "auto") -> str:
    """The output-slot variant for this model: "bias" | "weight" | "scale" | "stable" | "moe".

    "auto": bias if the MLP output matrix has one, else weight; Gemma-2/3 "stable" (the plain scale patch
    Δs = δ ⊘ u is ill-conditioned when some |u_j| is small, docs/theory.md §3.2); Mixtral "moe".
    """
    try:
        choice = OutputPatch(output_patch).value
    except ValueError:
        raise ContextPatchError(f"output_patch must be one of {[o.value for o in OutputPatch]}, "
                                f"got {output_patch!r}") from None
    kind = adapter.slot_kind
    if kind == "moe":
        if choice not in ("auto", "moe"):
            raise ContextPatchError(f"{adapter.name}: only the moe output patch is exact for this family "
                                    f"(got output_patch={choice!r})")
        return "moe"
    if kind == "scale":
        if choice not in ("auto", "scale", "stable"):
            raise ContextPatchError(f"{adapter.name}: the MLP output passes through a post-FF norm; use "
                                    f"output_patch 'stable' (default) or 'scale', not {choice!r}")
        return "stable" if choice == "auto" else choice
    if choice in ("scale", "stable", "moe"):
        raise ContextPatchError(f"{adapter.name} has no post-MLP norm or experts: use output_patch bias or weight "
                                f"(got {choice!r})")
    out = adapter.resolve(model)[0].output
    has_bias = getattr(out, "bias", None) is not None
    if choice == "bias" and not has_bias:
        raise ContextPatchError(f"{adapter.name}: the MLP output matrix has no bias; use output_patch='weight'")
    if choice == "auto":
        return "bias" if has_bias else "weight"
    return choice


class PatchSession:
    """Forward hooks on one model that apply per-token patches, computing them first in extraction mode.

    Extraction mode: ``targets`` given (and ``valid``: (B, T_q) bool, False on padding slots).
    Apply mode: ``layers`` given (one :class:`LayerPatch` per block).
    Use as a context manager; the model's parameters are never modified.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, slot: str, *, targets: Targets | None = None,
                 layers: list[LayerPatch] | None = None, valid: Tensor | None = None,
                 tol: float | None = None):
        if (targets is None) == (layers is None):
            raise ContextPatchError("PatchSession needs exactly one of targets (extract) or layers (apply)")
        self.model, self.adapter, self.slot, self.tol = model, adapter, slot, tol
        self.blocks = adapter.resolve(model)
        self.cd = compute_dtype(next(model.parameters()).dtype)
        self.targets = targets
        n = len(self.blocks)
        got = len(targets) if targets is not None else len(layers)
        if got != n:
            raise ContextPatchError(f"{'targets' if targets is not None else 'patches'} cover {got} layers, the "
                                    f"model has {n}")
        self.extracting = targets is not None
        self.valid = valid
        self.layers: list[LayerPatch] = list(layers) if layers is not None else [LayerPatch() for _ in range(n)]
        self.r: list[Tensor | None] = [None] * n
        self.delta: list[Tensor | None] = [None] * n
        self.gamma: list[Tensor | None] = [None] * n
        self._handles: list = []
        self._overrides: list = []

    # --- helpers -------------------------------------------------------------------------
    def vmask(self, like: Tensor) -> Tensor:
        """(B, T, 1) validity mask on like's device (all True when not given)."""
        if self.valid is None:
            return torch.ones(like.shape[:-1] + (1,), dtype=torch.bool, device=like.device)
        return self.valid.to(like.device).unsqueeze(-1)

    def _raise(self, i: int, e: DegenerateNormError):
        raise DegenerateNormError(f"layer {i}: {e}") from None

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
        lp = self.layers[i]
        mats = dict(b.inputs)
        if b.router is not None:
            mats["router"] = b.router
        V = None
        for name, mod in mats.items():
            try:
                p = input_patch(linear_weight(mod, self.adapter.conv1d).to(cd), zc_s, z_s, tol=self.tol)
            except DegenerateNormError as e:
                self._raise(i, e)
            V = p.V * vm.unsqueeze(-1) if V is None else V            # one shared right factor z/‖z‖²
            p = LowRankPatch(p.U * vm.unsqueeze(-1), V)
            if name == "router":
                lp.router = p
            else:
                lp.inputs[name] = p
        if b.experts is not None:
            U = torch.einsum("eoh,...h->...eo", b.experts.gate_up_proj.to(cd), zc_s - z_s) * vm.unsqueeze(-1)
            lp.experts_in = LowRankPatch(U.unsqueeze(-1), V.unsqueeze(-3).expand(U.shape[:-1] + V.shape[-2:]))
        r = self.r[i]
        rc = self.targets.r[i].to(device=r.device, dtype=cd)
        self.delta[i] = torch.where(vm, rc - r, torch.zeros_like(rc))
        if self.slot == "bias":
            lp.out_bias = self.delta[i]

    # --- hook factories ------------------------------------------------------------------
    def _install(self) -> None:
        H = self._handles
        cd = self.cd
        for b in self.blocks:
            i = b.index
            if self.extracting:
                H.extend(tap_residual(b, lambda r, i=i: self.r.__setitem__(i, r), lambda x: x.to(cd)))
                H.append(b.mlp.register_forward_pre_hook(
                    lambda mod, args, kwargs, b=b: self.compute_inputs(b, first_arg(args, kwargs)), with_kwargs=True))
            for name, mod in b.inputs.items():
                def in_hook(mod, args, out, i=i, name=name):
                    return out + side_path(self.layers[i].inputs[name], args[0], cd).to(out.dtype)
                H.append(mod.register_forward_hook(in_hook))
            if self.slot == "moe":
                H.append(b.router.register_forward_hook(_moe.router_hook(self, b)))
                self._overrides.append(_moe.override_experts(self, b))
            elif self.slot == "bias":
                def bias_hook(mod, args, out, i=i):
                    return out + self.layers[i].out_bias.to(device=out.device, dtype=out.dtype)
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
                    U = torch.where(vm, rho * unit_rms_fit(gamma, s) - y, torch.zeros_like(y))
                    self.gamma[i] = gamma
                try:
                    p = output_weight_patch(U, g_s, tol=self.tol)
                except DegenerateNormError as e:
                    self._raise(i, e)
                self.layers[i].out_weight = LowRankPatch(U.unsqueeze(-1), p.V * vm.unsqueeze(-1))
            return out + side_path(self.layers[i].out_weight, g, self.cd).to(out.dtype)
        return hook

    def _scale_hook(self, b):
        i, eps = b.index, norm_eps(b.scale_norm)

        def hook(mod, args, out):
            u = rms_unit(args[0].to(self.cd), eps)
            if self.extracting:
                vm = self.vmask(u)
                u_s = torch.where(vm, u, torch.ones_like(u))
                # naive: Δs = δ ⊘ u ;  stable: remainder Δs = (γ − N(y')) ⊘ u'  (N(y') = this norm's output)
                num = self.delta[i] if self.slot == "scale" else self.gamma[i] - out.to(self.cd)
                num = torch.where(vm, num, torch.zeros_like(num))
                if self.slot == "stable":   # a rounding-size remainder: coordinates with u_j ≈ 0 get none
                    tol = default_tol(self.cd) if self.tol is None else self.tol
                    big = u_s.abs() > tol
                    ds = torch.where(big, num / torch.where(big, u_s, torch.ones_like(u_s)), torch.zeros_like(num))
                else:
                    try:
                        ds = scale_patch(num, u_s, tol=self.tol).delta
                    except DegenerateNormError as e:
                        self._raise(i, e)
                self.layers[i].out_scale = ds
            return out + (self.layers[i].out_scale.to(device=u.device, dtype=self.cd) * u).to(out.dtype)
        return hook

    # --- context manager ------------------------------------------------------------------
    def __enter__(self) -> PatchSession:
        try:
            self._install()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for restore in self._overrides:
            restore()
        self._handles.clear()
        self._overrides.clear()
        self.r = [None] * len(self.blocks)


@dataclass
class PatchedResult:
    output: Tensor                       # (B, T_q, V) logits or (B, T_q, d) hidden states, compute dtype
    layers: list[LayerPatch]             # one per block, per-token factors (B, T_q, ·)
    slot: str
    past_key_values: object = None


def patched_pass(model: nn.Module, input_ids: Tensor, targets: Targets, *, adapter: FamilyAdapter | None = None,
                 valid: Tensor | None = None, position_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None, past_key_values=None, use_cache: bool = False,
                 output_patch: str | OutputPatch = "auto", tol: float | None = None,
                 **model_kwargs) -> PatchedResult:
    """Run the context-free tokens ``input_ids`` (B, T_q), computing and applying each layer's patches on the fly.

    ``targets`` must hold (B, T_q, ·) vectors aligned with ``input_ids`` (see :func:`capture_targets`).
    With ``past_key_values`` (a context-free cache of earlier, already patched tokens) only the new tokens run.
    """
    require_hf_model(model)
    adapter = adapter or get_adapter(model)
    slot = resolve_slot(adapter, model, output_patch)
    if input_ids.dim() != 2:
        raise ContextPatchError(f"input_ids must be (B, T_q), got shape {tuple(input_ids.shape)}")
    if targets.z and tuple(targets.z[0].shape[:2]) != tuple(input_ids.shape):
        raise ContextPatchError(f"targets are for {tuple(targets.z[0].shape[:2])} tokens, input_ids has shape "
                                f"{tuple(input_ids.shape)}")
    with PatchSession(model, adapter, slot, targets=targets, valid=valid, tol=tol) as sess:
        out = run_model(model, adapter, input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        past_key_values=past_key_values, use_cache=use_cache, **model_kwargs)
    layers = [_moe.finalize(lp, input_ids.shape) for lp in sess.layers]
    return PatchedResult(model_output(out).to(sess.cd), layers, slot, getattr(out, "past_key_values", None))
