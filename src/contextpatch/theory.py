"""The theory as pure tensor functions (tensors in, tensors out; no modules, no models).

Notation (Dherin et al. 2025, arXiv 2507.16003): a contextual block T_W(C, x) = f_θ(W A(C, x) + b)
with contextual layer A, context C, query x and first MLP matrix W of shape (d_out, d_in).
For a sub-context Y ⊆ C write

    a = A(C∖Y, x),   δ = A(C, x) − A(C∖Y, x)        (the "context vector" of Y)

Every function is batched over leading dimensions (tokens, layers, prompts) where shapes allow.
Every denominator is checked: a norm at or below ``tol`` raises :class:`DegenerateNormError`
instead of returning inf/NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import ContextPatchError, DegenerateNormError
from ._patches import LowRankPatch, ScalePatch, VectorPatch

__all__ = [
    "default_tol", "token_patch", "input_patch", "output_weight_patch", "bias_patch", "residual_patch",
    "scale_patch", "linear_attention_patch", "linear_loss", "GDDynamics", "gd_dynamics",
    "ProductDynamics", "product_dynamics", "static_patch", "normalized_inner",
]


def default_tol(dtype: torch.dtype) -> float:
    """Smallest norm accepted in a denominator: 1e-2·√eps (≈3e-6 for float32, ≈1.5e-10 for float64)."""
    return 1e-2 * torch.finfo(dtype).eps ** 0.5 if dtype.is_floating_point else 1e-6


def _sq_norm(a: Tensor, tol: float | None, what: str) -> Tensor:
    n2 = (a * a).sum(-1)
    t = default_tol(a.dtype) if tol is None else tol
    bad = ~(n2 > t * t)  # also catches NaN
    if bool(bad.any()):
        worst = float(n2.detach().min().sqrt()) if n2.numel() else float("nan")
        raise DegenerateNormError(
            f"‖{what}‖ = {worst:.3g} is at or below the tolerance {t:.3g} in {int(bad.sum())} of "
            f"{bad.numel()} case(s): the patch ΔW = (W δ) {what}ᵀ/‖{what}‖² would be inf/NaN. "
            "Pass tol= to change the threshold.")
    return n2


def _check_vec(name: str, x: Tensor, d: int) -> None:
    if x.dim() < 1 or x.shape[-1] != d:
        raise ContextPatchError(f"{name} must have last dimension {d} (the input width of W), got {tuple(x.shape)}")


def token_patch(W: Tensor, delta: Tensor, a: Tensor, *, tol: float | None = None) -> LowRankPatch:
    """Minimal token patch (Thm 2.2 / v4 Thm 2.3).

        ΔW = (W δ) aᵀ / ‖a‖²,   so   (W + ΔW) a = W (a + δ)

    With a = A(C∖Y, x) and δ = A(C, x) − A(C∖Y, x) this gives T_W(C, x) = T_{W+ΔW}(C∖Y, x).
    Among all E with E a = W δ, ΔW has the least Frobenius norm (it acts only along a).

    Args:
        W: (d_out, d_in), or batched (..., d_out, d_in).
        delta: (..., d_in) context vector δ.
        a: (..., d_in) the context-free (or reduced-context) layer output.
        tol: smallest accepted ‖a‖ (default :func:`default_tol`).
    Returns:
        rank-1 :class:`LowRankPatch` with U = W δ: (..., d_out, 1) and V = a/‖a‖²: (..., d_in, 1).
    """
    if W.dim() < 2:
        raise ContextPatchError(f"W must be a matrix (d_out, d_in), got shape {tuple(W.shape)}")
    d_in = W.shape[-1]
    _check_vec("delta", delta, d_in)
    _check_vec("a", a, d_in)
    n2 = _sq_norm(a, tol, "a")
    u = (W @ delta.unsqueeze(-1)).squeeze(-1)
    return LowRankPatch.outer(u, a / n2.unsqueeze(-1))


def input_patch(W: Tensor, z_context: Tensor, z: Tensor, *, tol: float | None = None) -> LowRankPatch:
    """Input-controllability patch: (W + ΔW) z = W z_context, with ΔW = W (z_C − z) zᵀ/‖z‖².

    The same right factor serves every matrix that reads the MLP input (gate and up projections).
    """
    return token_patch(W, z_context - z, z, tol=tol)


def output_weight_patch(delta_out: Tensor, g: Tensor, *, tol: float | None = None) -> LowRankPatch:
    """Output-controllability patch on a weight: (W + ΔW) g = W g + δ, with ΔW = δ gᵀ/‖g‖².

    Use it where the output slot has no bias (e.g. Llama's ``down_proj``). δ: (..., d_out), g: (..., d_in).
    """
    n2 = _sq_norm(g, tol, "g")
    return LowRankPatch.outer(delta_out, g / n2.unsqueeze(-1))


def bias_patch(W: Tensor, delta: Tensor) -> VectorPatch:
    """Bias / steering-vector form: Δb = W δ, so W a + (b + Δb) = W (a + δ) + b."""
    _check_vec("delta", delta, W.shape[-1])
    return VectorPatch((W @ delta.unsqueeze(-1)).squeeze(-1))


def residual_patch(delta: Tensor) -> VectorPatch:
    """Skip-connection vector patch Δb′ = δ, added on the residual path (paper App. C.1)."""
    return VectorPatch(delta)


def scale_patch(delta_out: Tensor, u: Tensor, *, tol: float | None = None) -> ScalePatch:
    """Element-wise (post-norm gain) patch: (s + Δs) ⊙ u = s ⊙ u + δ with Δs = δ ⊘ u.

    Raises :class:`DegenerateNormError` if any |u_j| ≤ tol (the Gemma-2/3 hazard).
    """
    t = default_tol(u.dtype) if tol is None else tol
    small = ~(u.abs() > t)
    if bool(small.any()):
        raise DegenerateNormError(
            f"scale patch Δs = δ ⊘ u needs every |u_j| > {t:.3g}; {int(small.sum())} coordinate(s) are smaller "
            f"(min |u_j| = {float(u.detach().abs().min()):.3g}). Use the stable variant or a rank-1 output patch.")
    return ScalePatch(delta_out / u)


def linear_attention_patch(W: Tensor, values: Tensor, keys: Tensor, q: Tensor, a: Tensor,
                           *, tol: float | None = None) -> LowRankPatch:
    """Linear self-attention (v4 Example 2.5): ΔW = W Δ(Y) P_x with

        Δ(Y) = Σ_{y∈Y} v_y k_yᵀ,   P_x = q_x aᵀ / ‖a‖²,   a = A(C∖Y, x)

    since for linear attention δA_x(Y) = Δ(Y) q_x. values: (..., |Y|, d_in), keys: (..., |Y|, d_k), q: (..., d_k).
    """
    if values.shape[-2] != keys.shape[-2]:
        raise ContextPatchError(f"values and keys must list the same tokens: {values.shape[-2]} vs {keys.shape[-2]}")
    delta = torch.einsum("...yv,...yk,...k->...v", values, keys, q)  # Δ(Y) q without forming Δ(Y)
    return token_patch(W, delta, a, tol=tol)


def linear_loss(W: Tensor, grad: LowRankPatch) -> Tensor:
    """The per-token linear loss of the implicit dynamics: L(W) = trace(Δᵀ W) = ⟨Δ, W⟩_F, with Δ = grad."""
    return (grad.U * (W @ grad.V)).sum((-1, -2))


def normalized_inner(A: LowRankPatch | Tensor, B: LowRankPatch | Tensor) -> Tensor:
    """⟨A, B⟩_F / (‖A‖_F ‖B‖_F) for dense matrices (..., m, n) or factored patches."""
    if isinstance(A, LowRankPatch) and isinstance(B, LowRankPatch):
        return A.inner(B) / (A.norm() * B.norm())
    A = A.dense() if isinstance(A, LowRankPatch) else A
    B = B.dense() if isinstance(B, LowRankPatch) else B
    return (A * B).sum((-1, -2)) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))


@dataclass(frozen=True)
class GDDynamics:
    """Scheme (a): tokens added one at a time, each patch measured against A(x).

    Attributes:
        patches: cumulative ΔW_i for prefixes c_1..c_i, i = 0..n: batch (..., n+1), ΔW_0 = 0.
        gradients: ∇L_i = Δ_i = W (A_i − A_{i+1}) A(x)ᵀ, i = 0..n−1: batch (..., n).
        lr: h = 1/‖A(x)‖²: (...).
        step_norms: ‖ΔW_{i+1} − ΔW_i‖_F = h ‖Δ_i‖_F, i = 0..n−1: (..., n).
    """

    patches: LowRankPatch
    gradients: LowRankPatch
    lr: Tensor
    step_norms: Tensor

    def step(self, i: int) -> LowRankPatch:
        """The update W_{i+1} − W_i = −h ∇L_i."""
        g = self.gradients[..., i]
        return LowRankPatch(-g.U * self.lr[..., None, None], g.V)


def gd_dynamics(W: Tensor, prefix_outputs: Tensor, *, tol: float | None = None) -> GDDynamics:
    """Implicit learning dynamics, scheme (a) (v1 Prop. 3.1):

        W_{i+1} = W_i − h ∇_W L_i(W_i),   h = 1/‖A(x)‖²,   L_i(W) = trace(Δ_iᵀ W),
        Δ_i = W (A(c_1..c_i, x) − A(c_1..c_{i+1}, x)) A(x)ᵀ

    so W_i = W + ΔW_i with ΔW_i = W (A(c_1..c_i, x) − A(x)) A(x)ᵀ/‖A(x)‖², and W_n = W + ΔW(C).

    Args:
        W: (d_out, d_in).
        prefix_outputs: (..., n+1, d_in), row i = A(c_1..c_i, x); row 0 = A(x).
    """
    if prefix_outputs.dim() < 2 or prefix_outputs.shape[-2] < 2:
        raise ContextPatchError("prefix_outputs needs rows A(x), A(c_1, x), ..., A(C, x): at least 2 rows "
                                f"(an empty context has no dynamics); got shape {tuple(prefix_outputs.shape)}")
    _check_vec("prefix_outputs", prefix_outputs, W.shape[-1])
    a = prefix_outputs[..., 0, :]
    n2 = _sq_norm(a, tol, "A(x)")
    h = 1.0 / n2
    Wt = W.transpose(-1, -2)
    left = (prefix_outputs - a.unsqueeze(-2)) @ Wt                     # (..., n+1, d_out): W (A_i − A_0)
    v = (a * h.unsqueeze(-1)).unsqueeze(-2).expand_as(prefix_outputs)  # (..., n+1, d_in)
    patches = LowRankPatch.outer(left, v)
    g_left = (prefix_outputs[..., :-1, :] - prefix_outputs[..., 1:, :]) @ Wt   # W (A_i − A_{i+1})
    gradients = LowRankPatch.outer(g_left, a.unsqueeze(-2).expand(g_left.shape[:-1] + a.shape[-1:]))
    # h ‖Δ_i‖_F = ‖W (A_{i+1} − A_i)‖ ‖a‖ / ‖a‖²
    step_norms = torch.linalg.vector_norm(g_left, dim=-1) / n2.sqrt().unsqueeze(-1)
    return GDDynamics(patches=patches, gradients=gradients, lr=h, step_norms=step_norms)


@dataclass(frozen=True)
class ProductDynamics:
    """Scheme (b): tokens removed from the front, multiplicative form (v4 Prop. 2.6 / Cor. C.3).

        W_i = W_{i−1} (I + h_i A_i),   A_i = δ_i a_iᵀ,   h_i = 1/‖a_i‖²
        W_n = W_0 (I + h_1 A_1) ⋯ (I + h_n A_n)

    Attributes:
        steps: W_i − W_{i−1} = (W_{i−1} δ_i)(h_i a_i)ᵀ for i = 1..n, batch (..., n), rank 1 each.
        lrs: h_i: (..., n).
        patch: W_n − W_0 as one factored patch of rank n (the sum of the steps).
    """

    steps: LowRankPatch
    lrs: Tensor

    @property
    def patch(self) -> LowRankPatch:
        return self.steps.sum(-1)

    def gradient(self, i: int) -> LowRankPatch:
        """∇L_i = Δ_i = −W_{i−1} δ_i a_iᵀ (1-based i), so that W_i = W_{i−1} − h_i Δ_i."""
        s = self.steps[..., i - 1]
        return LowRankPatch(-s.U, s.V / self.lrs[..., i - 1, None, None])


def product_dynamics(W: Tensor, suffix_outputs: Tensor, *, tol: float | None = None) -> ProductDynamics:
    """Scheme (b). suffix_outputs: (..., n+1, d_in) with row i = a_i = A(c_{i+1}..c_n, x):
    row 0 = A(C, x), row n = A(x). Then δ_i = a_{i−1} − a_i and T_{W_n}(x) = T_W(C, x).

    The product is kept factored: W_{i−1} δ_i = W δ_i + Σ_{j<i} u_j (v_jᵀ δ_i), O(n² d) work.
    """
    if suffix_outputs.dim() < 2 or suffix_outputs.shape[-2] < 2:
        raise ContextPatchError("suffix_outputs needs rows A(C, x), ..., A(x): at least 2 rows; "
                                f"got shape {tuple(suffix_outputs.shape)}")
    _check_vec("suffix_outputs", suffix_outputs, W.shape[-1])
    a = suffix_outputs[..., 1:, :]                                   # a_1..a_n
    deltas = suffix_outputs[..., :-1, :] - a                         # δ_1..δ_n
    n2 = _sq_norm(a, tol, "a_i")
    h = 1.0 / n2
    v = a * h.unsqueeze(-1)                                          # h_i a_i
    us: list[Tensor] = []
    for i in range(a.shape[-2]):
        d = deltas[..., i, :]
        u = (W @ d.unsqueeze(-1)).squeeze(-1)
        for j, uj in enumerate(us):
            u = u + uj * (v[..., j, :] * d).sum(-1, keepdim=True)
        us.append(u)
    U = torch.stack(us, -2)
    return ProductDynamics(steps=LowRankPatch.outer(U, v), lrs=h)


def static_patch(keys: Tensor, targets: Tensor, *, ridge: float = 0.0) -> LowRankPatch:
    """Query-independent "static thought patch" (v4 §3.4), fitted by (ridge) least squares:

        Δ = argmin_Δ Σ_k ‖Δ a_k − t_k‖² + λ‖Δ‖_F² = T (AᵀA + λI)⁻¹ Aᵀ   (λ = 0: T A⁺, minimum norm)

    with keys a_k = A(x_k) and targets t_k = W (A(C, x_k) − A(x_k)) over K calibration queries.

    Args:
        keys: (K, d_in); targets: (K, d_out); ridge: λ ≥ 0.
    Returns:
        :class:`LowRankPatch` of rank ≤ K with U = T (AᵀA + λI)⁻¹: (d_out, K) and V = A: (d_in, K).
    """
    if keys.dim() != 2 or targets.dim() != 2 or keys.shape[0] != targets.shape[0]:
        raise ContextPatchError(f"keys (K, d_in) and targets (K, d_out) must share K; got {tuple(keys.shape)} "
                                f"and {tuple(targets.shape)}")
    if keys.shape[0] == 0:
        raise ContextPatchError("static_patch needs at least one calibration query (K ≥ 1)")
    if ridge < 0:
        raise ContextPatchError(f"ridge must be ≥ 0, got {ridge}")
    G = keys @ keys.T                                                # (K, K) = AᵀA
    if ridge > 0:
        coef = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), targets)
    else:
        coef = torch.linalg.pinv(G, hermitian=True) @ targets
    return LowRankPatch(coef.T, keys.T)
