"""In-context linear regression prompts (Garg et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Prompts", "sample_prompts", "batch_generator", "query_tokens"]


@dataclass(frozen=True)
class Prompts:
    """A batch of B prompts. tokens: (B, N+1, d+1), rows (x_i, y_i) then the query row (x_q, 0).

    w: (B, d); xs: (B, N, d); ys: (B, N); xq: (B, d); yq: (B,) the query target ⟨w, x_q⟩.
    """

    tokens: Tensor
    w: Tensor
    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor

    @property
    def context(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def query(self) -> Tensor:
        return self.tokens[:, -1]

    def to(self, dtype: torch.dtype) -> Prompts:
        return Prompts(*(t.to(dtype) for t in (self.tokens, self.w, self.xs, self.ys, self.xq, self.yq)))


def query_tokens(x: Tensor) -> Tensor:
    """(…, d) inputs -> (…, d+1) tokens (x, 0), the form of a query (or a context-free example)."""
    return torch.cat([x, x.new_zeros(x.shape[:-1] + (1,))], -1)


def sample_prompts(n: int, n_context: int, d: int, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> Prompts:
    """n prompts with N = n_context examples each; w, x ~ N(0, I_d) drawn from ``generator``."""
    w = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x = torch.randn(n, n_context + 1, d, generator=generator, dtype=torch.float64)
    y = torch.einsum("bnd,bd->bn", x, w)
    tokens = torch.cat([x, y.unsqueeze(-1)], -1)
    tokens[:, -1, -1] = 0.0
    p = Prompts(tokens, w, x[:, :-1], y[:, :-1], x[:, -1], y[:, -1])
    return p.to(dtype)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training batch ``step``: deterministic in (seed, step), so resuming is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
