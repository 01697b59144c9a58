"""Factored patch types: low-rank matrix patches, vector (bias / steering) patches, scale patches.

Conventions
-----------
A matrix patch acts like an ``nn.Linear`` weight: ``ΔW`` has shape ``(d_out, d_in)`` and maps
``x ∈ R^{d_in}`` to ``ΔW x ∈ R^{d_out}``. It is stored factored,

    ΔW = U Vᵀ,   U: (..., d_out, r),   V: (..., d_in, r)

with any number of leading batch dimensions (tokens, layers, prompts). A rank-1 token patch has
``r = 1``. No dense ``d_out × d_in`` matrix is formed unless :meth:`LowRankPatch.dense` is called.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import ContextPatchError

__all__ = ["LowRankPatch", "VectorPatch", "ScalePatch", "stack_patches", "sum_patches"]


@dataclass(frozen=True)
class LowRankPatch:
    """ΔW = U Vᵀ with U: (..., d_out, r) and V: (..., d_in, r), batched over leading dims."""

    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.dim() < 2 or self.V.dim() < 2:
            raise ContextPatchError(f"LowRankPatch factors need shape (..., d, r); got U {tuple(self.U.shape)}, "
                             f"V {tuple(self.V.shape)}")
        if self.U.shape[:-2] != self.V.shape[:-2] or self.U.shape[-1] != self.V.shape[-1]:
            raise ContextPatchError(f"LowRankPatch factors disagree: U {tuple(self.U.shape)} vs V "
                                    f"{tuple(self.V.shape)} "
                             "(batch dims and rank must match)")

    @classmethod
    def outer(cls, u: Tensor, v: Tensor) -> LowRankPatch:
        """Rank-1 patch ΔW = u vᵀ from u: (..., d_out) and v: (..., d_in)."""
        return cls(u.unsqueeze(-1), v.unsqueeze(-1))

    # --- shape -----------------------------------------------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        return self.U.shape[:-2]

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense patch: (..., d_out, d_in)."""
        return self.batch_shape + (self.U.shape[-2], self.V.shape[-2])

    @property
    def rank(self) -> int:
        """Number of factor columns r (an upper bound on the matrix rank)."""
        return self.U.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def __getitem__(self, idx) -> LowRankPatch:
        """Index the batch dimensions (never the matrix dimensions)."""
        if not self.batch_shape:
            raise ContextPatchError("this patch has no batch dimensions to index")
        idx = idx if isinstance(idx, tuple) else (idx,)
        tail = (slice(None), slice(None)) if any(i is Ellipsis for i in idx) else (Ellipsis, slice(None), slice(None))
        return LowRankPatch(self.U[idx + tail], self.V[idx + tail])

    def to(self, *args, **kwargs) -> LowRankPatch:
        return LowRankPatch(self.U.to(*args, **kwargs), self.V.to(*args, **kwargs))

    # --- algebra ---------------------------------------------------------------------------
    def apply(self, x: Tensor) -> Tensor:
        """ΔW x = U (Vᵀ x) for x: (..., d_in) broadcast against the batch dims -> (..., d_out)."""
        coeff = torch.einsum("...ir,...i->...r", self.V, x.to(self.V.dtype))
        return torch.einsum("...or,...r->...o", self.U, coeff)

    def dense(self) -> Tensor:
        """The dense matrix U Vᵀ: (..., d_out, d_in). Only for analysis and small sizes."""
        return self.U @ self.V.transpose(-1, -2)

    def gram_norm_sq(self) -> Tensor:
        """‖U Vᵀ‖_F² = trace((UᵀU)(VᵀV)), computed without forming the matrix: (...)."""
        return ((self.U.transpose(-1, -2) @ self.U) * (self.V.transpose(-1, -2) @ self.V)).sum((-1, -2))

    def norm(self) -> Tensor:
        """Frobenius norm per batch element: (...)."""
        return self.gram_norm_sq().clamp_min(0).sqrt()

    def inner(self, other: LowRankPatch) -> Tensor:
        """Frobenius inner product ⟨ΔW, ΔW'⟩_F = trace((UᵀU')(V'ᵀV)), batched: (...)."""
        return ((self.U.transpose(-1, -2) @ other.U) * (self.V.transpose(-1, -2) @ other.V)).sum((-1, -2))

    def __add__(self, other: LowRankPatch) -> LowRankPatch:
        """Sum of two patches: the factors are concatenated (ranks add)."""
        if not isinstance(other, LowRankPatch):
            return NotImplemented
        return LowRankPatch(torch.cat(_bcast(self.U, other.U), -1), torch.cat(_bcast(self.V, other.V), -1))

    def __neg__(self) -> LowRankPatch:
        return LowRankPatch(-self.U, self.V)

    def __sub__(self, other: LowRankPatch) -> LowRankPatch:
        return self + (-other)

    def __mul__(self, scalar: float) -> LowRankPatch:
        return LowRankPatch(self.U * scalar, self.V)

    __rmul__ = __mul__

    def sum(self, dim: int = 0) -> LowRankPatch:
        """Sum over a batch dimension: the summed patch has rank r · size(dim)."""
        nb = len(self.batch_shape)
        if not -nb <= dim < nb:
            raise ContextPatchError(f"dim {dim} is not a batch dimension (batch shape {tuple(self.batch_shape)})")
        dim = dim % nb
        U = self.U.movedim(dim, -3)
        V = self.V.movedim(dim, -3)
        return LowRankPatch(_fold_rank(U), _fold_rank(V))

    def compress(self, rtol: float | None = None, max_rank: int | None = None) -> LowRankPatch:
        """Re-factor to the smallest rank (QR of both factors, SVD of the small core).

        Singular values below ``rtol · σ_max`` are dropped (default: 10 · eps of the dtype · rank).
        Batched patches keep the largest rank needed by any batch element. ``max_rank`` additionally keeps at
        most that many singular directions (the best rank-r approximation in Frobenius norm, Eckart–Young).
        """
        if max_rank is not None and max_rank < 1:
            raise ContextPatchError(f"max_rank must be ≥ 1, got {max_rank}")
        Qu, Ru = torch.linalg.qr(self.U)
        Qv, Rv = torch.linalg.qr(self.V)
        P, S, Qh = torch.linalg.svd(Ru @ Rv.transpose(-1, -2))
        tol = rtol if rtol is not None else 10 * torch.finfo(self.dtype).eps * max(self.rank, 1)
        keep = int((S > tol * S[..., :1]).sum(-1).max().item()) if S.numel() else 0
        keep = max(keep, 1)
        if max_rank is not None:
            keep = min(keep, max_rank)
        sq = S[..., :keep].sqrt()
        return LowRankPatch(Qu @ P[..., :keep] * sq.unsqueeze(-2),
                            Qv @ Qh.transpose(-1, -2)[..., :keep] * sq.unsqueeze(-2))

    def nbytes(self) -> int:
        """Bytes held by the factors (to compare with the dense d_out·d_in matrices)."""
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()

    def dense_nbytes(self) -> int:
        """Bytes the dense matrices this patch stands for would take."""
        n = 1
        for s in self.shape:
            n *= s
        return n * self.U.element_size()


@dataclass(frozen=True)
class VectorPatch:
    """An additive vector Δb: (..., d) — a bias patch or a residual-stream (steering) vector."""

    delta: Tensor

    def apply(self, y: Tensor) -> Tensor:
        return y + self.delta.to(y.dtype)

    def norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.delta, dim=-1)


@dataclass(frozen=True)
class ScalePatch:
    """An element-wise scale change Δs: (..., d), acting as y -> (s + Δs) ⊙ u (e.g. a norm's gain)."""

    delta: Tensor

    def norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.delta, dim=-1)


def stack_patches(patches: list[LowRankPatch], dim: int = 0) -> LowRankPatch:
    """Stack patches of equal rank along a new batch dimension."""
    if not patches:
        raise ContextPatchError("stack_patches needs at least one patch")
    ranks = {p.rank for p in patches}
    if len(ranks) != 1:
        raise ContextPatchError(f"stack_patches needs equal ranks, got {sorted(ranks)}")
    nb = len(patches[0].batch_shape)
    d = dim if dim >= 0 else dim + nb + 1
    return LowRankPatch(torch.stack([p.U for p in patches], d), torch.stack([p.V for p in patches], d))


def sum_patches(patches: list[LowRankPatch]) -> LowRankPatch:
    """Sum of patches (ranks add); see :meth:`LowRankPatch.compress` to re-factor."""
    if not patches:
        raise ContextPatchError("sum_patches needs at least one patch")
    out = patches[0]
    for p in patches[1:]:
        out = out + p
    return out


def _bcast(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.expand(batch + a.shape[-2:]), b.expand(batch + b.shape[-2:])


def _fold_rank(X: Tensor) -> Tensor:
    """(..., n, d, r) -> (..., d, n·r): fold a batch dim into the rank dim."""
    X = X.movedim(-3, -2)  # (..., d, n, r)
    return X.reshape(X.shape[:-2] + (X.shape[-2] * X.shape[-1],))
