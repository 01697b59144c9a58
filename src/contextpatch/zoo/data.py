"""Training and evaluation batches: examples → right-padded token ids and per-token loss weights.

A batch is ``ids: (B, T) int64`` (``<bos>`` first, ``<pad>`` = 0 after the end) and ``weights: (B, T)`` with
``weights[b, t] = 1`` where token ``t`` is an answer token (a target), else 0. The loss predicts token ``t``
from tokens ``< t``, so the model is scored on ``weights[:, 1:]`` against ``logits[:, :-1]``. Right padding
needs no attention mask: causal attention never lets a real token see a later pad.

Every training batch is a pure function of ``(seed, step)`` (``numpy.random.default_rng([seed, step])``), so
resuming from a checkpoint replays exactly the same data.
"""

from __future__ import annotations

import numpy as np
import torch

from .tasks import CopyTask, Example, FactsTask, FunctionTask, InstructionTask, LagTask
from .tokenizer import PAD, encode_words

__all__ = ["encode_example", "collate", "tasks_for", "sample_batch", "max_shots_at", "answer_loss"]

#: (lowest shots, queries per training sequence) per family
_SHOTS_LO = {"function": 1, "facts": 1, "instruction": 0, "copy": 0, "lag": 0}


def encode_example(ex: Example, *, with_context: bool = True, demo_targets: bool = True) -> tuple[list, list]:
    """Token ids (with ``<bos>``) and 0/1 target weights of one example."""
    ids, w = encode_words("", bos=True), [0.0]
    for text, target in ex.segments(with_context=with_context, demo_targets=demo_targets):
        t = encode_words(text, bos=False)
        ids += t
        w += [1.0 if target else 0.0] * len(t)
    return ids, w


def collate(rows: list[tuple[list, list]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, weights) rows to ``(B, T)`` tensors."""
    T = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    w = torch.zeros((len(rows), T), dtype=torch.float32)
    for b, (i, ww) in enumerate(rows):
        ids[b, : len(i)] = torch.tensor(i)
        w[b, : len(ww)] = torch.tensor(ww)
    return ids, w


def answer_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_t w_t · CE(logits_{t-1}, ids_t) / Σ_t w_t``: (B, T, V) logits of a batch scored on ``weights[:, 1:]``
    (answer-only when the weights are the 0/1 answer masks of :func:`collate`)."""
    lg = logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def tasks_for(cfg) -> dict:
    """The task objects a ``TrainConfig`` describes."""
    return {"function": FunctionTask(p=cfg.function_p, slopes=tuple(cfg.function_slopes), noise=cfg.function_noise),
            "facts": FactsTask(),
            "instruction": InstructionTask(), "copy": CopyTask(), "lag": LagTask()}


def max_shots_at(cfg, step: int) -> int:
    """Curriculum: the largest number of shots at ``step``, linear from ``curriculum_start`` to ``max_shots``
    over the first ``curriculum_frac`` of the steps."""
    if cfg.curriculum_frac <= 0:
        return cfg.max_shots
    f = min(1.0, step / max(1.0, cfg.curriculum_frac * cfg.steps))
    return int(round(cfg.curriculum_start + f * (cfg.max_shots - cfg.curriculum_start)))


def sample_batch(cfg, step: int, tasks: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: families drawn by ``cfg.mix``, shots uniform in ``[lo, max_shots_at]``."""
    tasks = tasks or tasks_for(cfg)
    rng = np.random.default_rng([cfg.seed, step])
    fams = [f for f, _ in cfg.mix]
    p = np.array([w for _, w in cfg.mix], dtype=float)
    top = max_shots_at(cfg, step)
    rows = []
    for fam in rng.choice(fams, size=cfg.batch_size, p=p / p.sum()):
        k = int(rng.integers(_SHOTS_LO[fam], max(_SHOTS_LO[fam], top) + 1))
        ex = tasks[fam].sample(rng, k, n_queries=cfg.queries)
        rows.append(encode_example(ex, demo_targets=cfg.demo_targets))
    return collate(rows)
