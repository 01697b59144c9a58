"""Thought patches on a language model: one static patch per layer for a fixed context, fitted on K calibration
queries, scored on held-out queries by exact answer (issue 9 §3; the paper's v4 §3.4 thought patch, there on
the regression toy).

For each family, ``contexts`` fixed contexts ``<bos> CONTEXT`` and, for K in ``ks``, ``engine.fit_static`` on K
calibration queries ``QUERY ANSWER`` (drawn with replacement from a calibration pool) in the drop-in setting
(``keep_prefix=1, renumber_positions=True``: the adapted model reads ``<bos> QUERY`` at positions 0.., as a user
runs it without the context). Held-out queries are never in the calibration pool:

* ``function``: 16 demonstrations of a noisy shift; 6 query values never among the demonstrations' inputs, 3
  held out, the other 3 and the demonstrated inputs form the pool (the answers are the rule's);
* ``facts``: a sheet of 24 facts; 8 keys held out, questions about the other 16 form the pool (``asked``: the
  accuracy on the pool's questions, i.e. recall of the facts the patch was fitted on, is reported too);
* ``instruction``: ``mode: M ;`` and 2 demonstrations; the pool and the held-out set are fresh random lists.

Accuracy = greedy exact match (all teacher-forced argmaxes over the answer right), for the adapted model, the
model with the context (the ceiling) and the model without it (the floor), on the same held-out queries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..engine import fit_static
from ..zoo.tasks import Example
from .prompts import Prompt, make_prompt, prompt_tasks

__all__ = ["thought_patches", "KS", "fixed_contexts"]

KS = (1, 2, 4, 8, 16, 32, 64)


def _prompt(ex: Example, q: str, a: str) -> Prompt:
    return make_prompt(Example(ex.family, ex.shots, ex.context, [(q, a)], ex.head, ex.demos))


def fixed_contexts(family: str, count: int, *, seed: int, pool_size: int = 64, held_out: int = 32):
    """``count`` (context example, calibration pool, held-out, asked) tuples of prompts (module docstring)."""
    tasks = prompt_tasks()
    rng = np.random.default_rng([seed, 31, len(family)])
    out = []
    for _ in range(count):
        if family == "function":
            ex = tasks["function"].sample(rng, 16, n_queries=6)
            demo_x = sorted({q for q, _, _ in ex.demos})
            p = tasks["function"].p
            q0, a0 = ex.pairs[0]                            # the queries' answers follow the clean rule
            shift = (int(a0) - int(q0.split()[0])) % p      # (the zoo recipe's rule is a shift: slopes=(1,))
            pool = [_prompt(ex, q, a) for q, a in ex.pairs[:3]]
            pool += [_prompt(ex, q, str((int(q.split()[0]) + shift) % p)) for q in demo_x]
            held = [_prompt(ex, q, a) for q, a in ex.pairs[3:]]
            asked = pool
        elif family == "facts":
            ex = tasks["facts"].sample(rng, 24, n_queries=24)
            held = [_prompt(ex, q, a) for q, a in ex.pairs[:8]]
            pool = [_prompt(ex, q, a) for q, a in ex.pairs[8:]]
            asked = pool
        else:
            ex = tasks["instruction"].sample(rng, 2, n_queries=pool_size + held_out)
            pool = [_prompt(ex, q, a) for q, a in ex.pairs[:pool_size]]
            held = [_prompt(ex, q, a) for q, a in ex.pairs[pool_size:]]
            asked = pool[:held_out]
        out.append((ex, pool, held, asked))
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, prompts: list[Prompt], *, with_context: bool) -> float:
    rows = [p.ids if with_context else p.no_context_ids for p in prompts]
    T = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    logits = model(input_ids=ids).logits                     # right padding: causal rows never see it
    hits = []
    for i, p in enumerate(prompts):
        s = p.answer_start if with_context else p.answer_start - (p.context_end - 1)
        pred = logits[i, s - 1: s - 1 + p.answer_ids.numel()].argmax(-1)
        hits.append(bool((pred == p.answer_ids).all()))
    return float(np.mean(hits))


def thought_patches(model: nn.Module, *, families=("function", "facts", "instruction"), contexts: int = 3,
                    ks=KS, seed: int = 0, ridge: float = 1e-3, progress=None) -> dict:
    """Held-out exact-answer accuracy of the static patch vs K, per family (mean over the fixed contexts), with
    the with-context and no-context accuracy on the same queries, and the fit time."""
    import time

    out = {}
    for fam in families:
        ctxs = fixed_contexts(fam, contexts, seed=seed)
        rng = np.random.default_rng([seed, 17])
        acc, asked, secs = {k: [] for k in ks}, {k: [] for k in ks}, {k: [] for k in ks}
        ceil, floor = [], []
        for _ex, pool, held, ask in ctxs:
            ceil.append(_accuracy(model, held, with_context=True))
            floor.append(_accuracy(model, held, with_context=False))
            ctx_ids = pool[0].context_ids
            for k in ks:
                cal = [pool[int(i)].query_ids for i in rng.integers(len(pool), size=k)]
                t0 = time.perf_counter()
                static = fit_static(model, ctx_ids, cal, ridge=ridge, keep_prefix=1, renumber_positions=True,
                                    seed=seed)
                secs[k].append(time.perf_counter() - t0)
                with static.applied(model):
                    acc[k].append(_accuracy(model, held, with_context=False))
                    asked[k].append(_accuracy(model, ask, with_context=False))
                if progress is not None:
                    progress(1)
        out[fam] = {"ks": list(ks), "contexts": contexts, "held_out_per_context": len(ctxs[0][2]),
                    "held_out_accuracy": [float(np.mean(acc[k])) for k in ks],
                    "asked_accuracy": [float(np.mean(asked[k])) for k in ks],
                    "with_context_accuracy": float(np.mean(ceil)), "without_context_accuracy": float(np.mean(floor)),
                    "fit_seconds": [float(np.mean(secs[k])) for k in ks]}
    return out
