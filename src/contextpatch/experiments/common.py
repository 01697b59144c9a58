"""Shared helpers of the experiments: seeded prompts, the contextual layer of a single block, statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .data import Prompts, sample_prompts
from .models import ICLModel

__all__ = ["ExperimentResult", "test_prompts", "model_prefix_outputs", "context_free_outputs", "mean_se"]


@dataclass
class ExperimentResult:
    """What one experiment hands back: metrics (JSON-able), a markdown report section, figure file names."""

    name: str
    metrics: dict[str, Any]
    report: str
    figures: list[str] = field(default_factory=list)


def test_prompts(model: ICLModel, n: int, seed: int, dtype: torch.dtype = torch.float32) -> Prompts:
    """n prompts of the model's task (d, N), drawn in float64 from ``seed`` and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return sample_prompts(n, model.task.n_context, model.task.d, generator=g, dtype=torch.float64).to(dtype)


@torch.no_grad()
def model_prefix_outputs(model: ICLModel, tokens: Tensor) -> Tensor:
    """A(c_1..c_i, x) for i = 0..N at the query, for a one-block model: (B, N+1, d_model); row 0 = A(x)."""
    if len(model.blocks) != 1:
        raise ValueError("model_prefix_outputs is defined here for one-block models (single, rnn)")
    layer = model.blocks[0].layer
    h = model.embed(tokens)
    rows = [layer(torch.cat([h[:, :i], h[:, -1:]], 1))[:, -1] for i in range(tokens.shape[1])]
    return torch.stack(rows, 1)


@torch.no_grad()
def context_free_outputs(model: ICLModel, query: Tensor) -> Tensor:
    """A(x) for query tokens (…, d+1) of a one-block model: (…, d_model)."""
    return model.blocks[0].layer(model.embed(query).unsqueeze(-2))[..., 0, :]


def mean_se(x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Mean and standard error of the mean along ``dim``."""
    n = x.shape[dim]
    return x.mean(dim), x.std(dim, unbiased=True) / n ** 0.5 if n > 1 else torch.zeros_like(x.mean(dim))
