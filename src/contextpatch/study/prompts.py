"""Held-out prompts of the zoo task families as token tensors, and exact-answer scoring.

A prompt is ``<bos> CONTEXT QUERY ANSWER`` (one query). Token spans, for ``ids`` of length ``L``:

    ids[0]                        <bos>                 (kept in every context-free input)
    ids[1 : context_end]          the context (k shots) (what a patch or an adapter replaces)
    ids[context_end : answer_start]   the query words   (``x ->``, ``kI``, ``4 1 9 =>``)
    ids[answer_start : L]         the answer words      (scored: greedy exact match)

``context=(1, context_end)`` is the span to hand to ``extract``/``verify``/``generate`` so that the context-free
input is ``<bos> QUERY ANSWER``, the input the zoo's no-context evaluation uses. Greedy decoding reproduces the
answer iff every teacher-forced argmax over the answer is right (zoo/evaluate.py), so
``answer_correct(logits, prompt)`` scores one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._errors import ContextPatchError
from ..zoo.data import tasks_for
from ..zoo.tasks import FAMILIES, Example
from ..zoo.tokenizer import encode_words

__all__ = ["Prompt", "make_prompt", "make_prompts", "answer_correct", "prompt_tasks"]


@dataclass(frozen=True)
class Prompt:
    """One ``<bos> CONTEXT QUERY ANSWER`` prompt (spans in the module docstring)."""

    family: str
    shots: int
    ids: Tensor            # (L,) int64
    context_end: int       # 1 + number of context tokens
    answer_start: int
    example: Example

    @property
    def context(self) -> tuple[int, int]:
        """The context span for ``extract(..., context=prompt.context)`` (``<bos>`` stays in the query side)."""
        return (1, self.context_end)

    @property
    def context_ids(self) -> Tensor:
        """``<bos> CONTEXT`` (n,)."""
        return self.ids[: self.context_end]

    @property
    def query_ids(self) -> Tensor:
        """``QUERY ANSWER`` (the continuation of ``context_ids``)."""
        return self.ids[self.context_end:]

    @property
    def no_context_ids(self) -> Tensor:
        """``<bos> QUERY ANSWER``."""
        return torch.cat([self.ids[:1], self.query_ids])

    @property
    def answer_ids(self) -> Tensor:
        return self.ids[self.answer_start:]


def prompt_tasks(config=None) -> dict:
    """The task objects of the zoo recipe (``config``: a zoo ``TrainConfig``; default the recipe defaults)."""
    from ..zoo.config import TrainConfig

    return tasks_for(config or TrainConfig())


def make_prompt(example: Example, query: int = 0) -> Prompt:
    """The prompt of ``example``'s context and its ``query``-th (query, answer) pair."""
    ctx = encode_words(example.context, bos=True) if example.context else encode_words("", bos=True)
    q, a = example.pairs[query]
    qi, ai = encode_words(q, bos=False), encode_words(a, bos=False)
    ids = torch.tensor(ctx + qi + ai, dtype=torch.long)
    return Prompt(example.family, example.shots, ids, len(ctx), len(ctx) + len(qi), example)


def make_prompts(family: str, n: int, shots: int, *, seed: int, tasks: dict | None = None) -> list[Prompt]:
    """``n`` held-out prompts of ``family`` with ``shots`` shots, seeded by ``(seed, family, shots)``.

    Seeds are offset from the zoo's training streams (``default_rng([train_seed, step])``, two entries) by using
    three entries, so these prompts are fresh draws, not training batches.
    """
    if family not in FAMILIES:
        raise ContextPatchError(f"unknown task family {family!r}; families: {', '.join(FAMILIES)}")
    tasks = tasks or prompt_tasks()
    rng = np.random.default_rng([seed, FAMILIES.index(family), shots, 7919])
    return [make_prompt(tasks[family].sample(rng, shots, n_queries=1)) for _ in range(n)]


def answer_correct(logits: Tensor, prompt: Prompt, *, offset: int = 0) -> bool:
    """Whether greedy decoding reproduces ``prompt``'s answer, from the logits of one teacher-forced pass.

    ``logits``: (L', V) over the sequence whose answer starts at ``prompt.answer_start - offset`` (``offset``:
    the number of tokens removed before the query, e.g. ``context_end - 1`` for ``<bos> QUERY ANSWER``).
    """
    s = prompt.answer_start - offset
    pred = logits[s - 1: s - 1 + prompt.answer_ids.numel()].argmax(-1)
    return bool((pred.cpu() == prompt.answer_ids).all())
