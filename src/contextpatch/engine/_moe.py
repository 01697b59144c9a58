"""Mixture-of-experts side paths (Mixtral layout: router (E, d); experts.gate_up_proj (E, 2I, d),
experts.down_proj (E, d, I); top-k softmax routing renormalised).

With z the context-free MoE input and z_C the target:

    router       ΔW_r = W_r (z_C − z) zᵀ/‖z‖²         => same logits, same top-k set and weights w_e
    every expert ΔGU_e = GU_e (z_C − z) zᵀ/‖z‖²        => expert e sees z_C
    active e     ΔD_e = (δ/S) g_eᵀ/‖g_e‖²,  S = Σ_active w_e   => Σ_e w_e (D_e g_e + δ/S) = MoE(z_C) + δ

The experts' fused 3-D weights have no Linear module to hook, so while a session is active the experts
module's forward is replaced by the loop below (same per-expert order as HF), with rank-1 side paths.
Factors live in the block's :class:`LayerPatch` (``router``, ``experts_in``, ``experts_out``; leading dims
(B, T_q), flattened here to the experts' token axis).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.nn import functional as F

from .._patches import LowRankPatch
from ._records import LayerPatch

__all__ = ["router_hook", "override_experts", "finalize"]


def _flat(t: Tensor, trailing: int) -> Tensor:
    """(B, T, ...) or already flat (B·T, ...) -> (B·T, ...) for the experts' flattened token axis."""
    return t.reshape((-1,) + t.shape[t.dim() - trailing:])


def router_hook(sess, b):
    i = b.index

    def hook(mod, args, out):
        z = args[0]
        logits = out[0]
        p = sess.layers[i].router
        U = _flat(p.U[..., 0], 1).to(z.device, sess.cd)
        V = _flat(p.V[..., 0], 1).to(z.device, sess.cd)
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
        lp: LayerPatch = sess.layers[i]
        V = _flat(lp.router.V[..., 0], 1).to(x.device, cd)                        # z/‖z‖² per token: (n, d)
        Ugu = _flat(lp.experts_in.U[..., 0], 2).to(x.device, cd)                  # (n, E, 2I)
        coeff = (V * x).sum(-1, keepdim=True)                                   # Vᵀz per token: (n, 1)
        if sess.extracting:
            E, I = self.down_proj.shape[0], self.down_proj.shape[2]
            Ud = torch.zeros(n, E, d, dtype=cd, device=x.device)
            Vd = torch.zeros(n, E, I, dtype=cd, device=x.device)
            delta = sess.delta[i].reshape(n, d)
            S = top_k_weights.to(cd).sum(-1, keepdim=True)
        else:
            Ud = _flat(lp.experts_out.U[..., 0], 2).to(x.device, cd)
            Vd = _flat(lp.experts_out.V[..., 0], 2).to(x.device, cd)
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
            lp.experts_out = LowRankPatch(Ud.unsqueeze(-1), Vd.unsqueeze(-1))
        return out.to(hidden_states.dtype)

    experts.forward = types.MethodType(forward, experts)

    def restore():
        if previous is not None:
            experts.forward = previous
        else:
            del experts.forward
    return restore


def finalize(lp: LayerPatch, shape) -> LayerPatch:
    """Reshape the flat (B·T, E, ·, 1) expert down factors back to (B, T, E, ·, 1)."""
    p = lp.experts_out
    if p is not None and p.U.dim() == 4:
        lp.experts_out = LowRankPatch(p.U.reshape(tuple(shape) + p.U.shape[1:]),
                                      p.V.reshape(tuple(shape) + p.V.shape[1:]))
    return lp
