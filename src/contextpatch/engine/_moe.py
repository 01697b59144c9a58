"""Mixture-of-experts side paths (Mixtral layout: router (E, d); experts.gate_up_proj (E, 2I, d),
experts.down_proj (E, d, I); top-k softmax routing renormalised).

With z the context-free MoE input and z_C the target:

    router       ΔW_r = W_r (z_C − z) zᵀ/‖z‖²         => same logits, same top-k set and weights w_e
    every expert ΔGU_e = GU_e (z_C − z) zᵀ/‖z‖²        => expert e sees z_C
    active e     ΔD_e = (δ/S) g_eᵀ/‖g_e‖²,  S = Σ_active w_e   => Σ_e w_e (D_e g_e + δ/S) = MoE(z_C) + δ

The experts' fused 3-D weights have no Linear module to hook, so while a session is active the experts
module's forward is replaced by the loop below (same per-expert order as HF), with rank-1 side paths.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["router_hook", "override_experts", "finalize"]

_DOWN = ("experts.down.U", "experts.down.V")


_TRAILING = {"router.U": 1, "in.V": 1, "experts.gate_up.U": 2, _DOWN[0]: 2, _DOWN[1]: 2}


def _flat(t: Tensor, key: str) -> Tensor:
    """(B, T, ...) or already flat (B·T, ...) -> (B·T, ...) for the experts' flattened token axis."""
    k = _TRAILING[key]
    return t.reshape((-1,) + t.shape[t.dim() - k:])


def router_hook(sess, b):
    i = b.index

    def hook(mod, args, out):
        z = args[0]
        logits = out[0]
        U = _flat(sess.get(i, "router.U", z), "router.U")
        V = _flat(sess.get(i, "in.V", z), "in.V")
        new = (logits.to(sess.cd) + U * (V * z.to(sess.cd)).sum(-1, keepdim=True)).to(logits.dtype)
        probs = torch.softmax(new.float(), dim=-1)
        top, idx = torch.topk(probs, mod.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return (new, top, idx) + tuple(out[3:])
    return hook


def override_experts(sess, b):
    """Replace ``b.experts.forward`` for the session; returns the restore function."""
    experts, i, cd = b.experts, b.index, sess.cd
    previous = experts.__dict__.get("forward")

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        n, d = hidden_states.shape
        x = hidden_states.to(cd)
        V = _flat(sess.get(i, "in.V", x), "in.V")
        Ugu = _flat(sess.get(i, "experts.gate_up.U", x), "experts.gate_up.U")
        coeff = (V * x).sum(-1, keepdim=True)                                   # Vᵀz per token: (n, 1)
        P = sess.layers[i]
        if sess.extracting:
            E, I = self.down_proj.shape[0], self.down_proj.shape[2]
            P[_DOWN[0]] = torch.zeros(n, E, d, dtype=cd, device=x.device)
            P[_DOWN[1]] = torch.zeros(n, E, I, dtype=cd, device=x.device)
            delta = sess.delta[i].reshape(n, d)
            S = top_k_weights.to(cd).sum(-1, keepdim=True)
        Ud, Vd = (_flat(P[k], k).to(x.device, cd) for k in _DOWN)
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            if e >= self.gate_up_proj.shape[0]:
                continue
            tok, pos = torch.where(top_k_index == e)
            xe = x[tok]
            gu = F.linear(xe, self.gate_up_proj[e].to(cd)) + Ugu[tok, e] * coeff[tok]
            gate, up = gu.chunk(2, dim=-1)
            g = self.act_fn(gate) * up
            if sess.extracting:
                Ud[tok, e] = delta[tok] / S[tok]
                Vd[tok, e] = g / (g * g).sum(-1, keepdim=True)
            y = F.linear(g, self.down_proj[e].to(cd)) + Ud[tok, e] * (Vd[tok, e] * g).sum(-1, keepdim=True)
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None].to(cd))
        if sess.extracting:
            P[_DOWN[0]], P[_DOWN[1]] = Ud, Vd
        return out.to(hidden_states.dtype)

    experts.forward = types.MethodType(forward, experts)

    def restore():
        if previous is not None:
            experts.forward = previous
        else:
            del experts.forward
    return restore


def finalize(P: dict[str, Tensor], shape) -> dict[str, Tensor]:
    """Reshape the flat (B·T, E, ·) expert down factors back to (B, T, E, ·)."""
    out = dict(P)
    for k in _DOWN:
        if k in out and out[k].dim() == 3:
            out[k] = out[k].reshape(tuple(shape) + out[k].shape[1:])
    return out
