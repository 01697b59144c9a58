"""Fixed contexts of the zoo task families compressed into adapters: contexts, held-out queries, metrics.

A **fixed context** is ``<bos> CONTEXT`` (n tokens) with two disjoint sets of continuations ("queries"): the
calibration queries every method fits on, and held-out queries never used for fitting. A query is
``QUERY ANSWER`` tokens (or a chain ``Q1 A1 ; Q2 A2``) with the answer spans marked.

    function      one rule y = x + b mod p shown by 16 demonstrations; query x values never among the demos
                  (as in training); calibration on half of the query x values (singles and chains of two),
                  held out: the other half (the adapter must carry the rule, not a table)
    facts         a sheet of k ∈ {8, 16, 32} facts ``kI vJ ;``; calibration: every key asked alone and in chains
                  of two; held out: chains of three keys never asked together (new combinations, a new answer
                  position). ``split="unseen"``: calibration on half of the keys, held out: the other half (a
                  compressed sheet only holds what it was fitted on: the negative control)
    instruction   ``mode: M ;`` plus 0 or a few demonstrations; calibration and held-out queries are distinct
                  random digit lists

Metrics of a method on a set of queries (logits (K, T, V) of the query tokens; teacher = with context):

    kl         mean over query tokens t of KL(p_ctx(·|t) ‖ p_method(·|t)) = Σ_v p_ctx (log p_ctx − log p_method)
    top1       mean over query tokens of [argmax p_method = argmax p_ctx]
    accuracy   mean over answers of [every teacher-forced argmax over the answer equals the answer token]
               (greedy exact match, zoo/evaluate.py)
    recovered  (acc_method − acc_no_context) / (acc_with_context − acc_no_context): share of the context's gain

Every sampler is seeded by ``numpy.random.default_rng([seed, family index, context index, 7919])``; the seed
is recorded in each :class:`FixedContext`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from ..engine._static_fit import QueryBatch, query_batch, teacher_logits
from ..zoo.tasks import FAMILIES, MODES, apply_mode
from ..zoo.tokenizer import encode_words
from .prompts import prompt_tasks

__all__ = ["Query", "FixedContext", "make_query", "function_contexts", "facts_contexts", "FACT_SPLITS",
           "instruction_contexts",
           "zoo_contexts", "score", "answer_accuracy", "recovered_share", "Runner", "run_queries", "no_context",
           "with_context", "evaluate_runner", "first_reaching", "fit_static_cv", "compare_methods", "context_bars",
           "calibration_sweep", "DROP_IN", "FITTED", "HYBRIDS", "INSTRUCTIONS"]


@dataclass(frozen=True)
class Query:
    """``ids``: (T,) the continuation of the context; ``answers``: (start, end) spans of answer tokens in ids."""

    ids: Tensor
    answers: tuple[tuple[int, int], ...]
    text: str


@dataclass(frozen=True)
class FixedContext:
    """One fixed context (``context_ids`` = ``<bos> CONTEXT``) with disjoint calibration and held-out queries."""

    family: str
    name: str
    context_ids: Tensor
    calibration: tuple[Query, ...]
    held_out: tuple[Query, ...]
    seed: int
    text: str


def make_query(pairs: Sequence[tuple[str, str]]) -> Query:
    """The query ``Q1 A1 ; Q2 A2 ; …`` (no trailing ``;``) of (query words, answer words) pairs."""
    if not pairs:
        raise ContextPatchError("a query needs at least one (query, answer) pair")
    ids: list[int] = []
    spans = []
    for i, (q, a) in enumerate(pairs):
        if i:
            ids += encode_words(";", bos=False)
        ids += encode_words(q, bos=False)
        a_ids = encode_words(a, bos=False)
        if not a_ids:
            raise ContextPatchError(f"empty answer for query {q!r}")
        spans.append((len(ids), len(ids) + len(a_ids)))
        ids += a_ids
    return Query(torch.tensor(ids, dtype=torch.long), tuple(spans), " ; ".join(f"{q} {a}" for q, a in pairs))


def _rng(seed: int, family: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, FAMILIES.index(family), index, 7919])


def _context(family: str, name: str, text: str, cal, held, seed: int) -> FixedContext:
    ids = torch.tensor(encode_words(text, bos=True), dtype=torch.long)
    cal_t, held_t = {q.text for q in cal}, {q.text for q in held}
    if cal_t & held_t:
        raise ContextPatchError(f"{name}: held-out queries overlap the calibration queries")
    return FixedContext(family, name, ids, tuple(cal), tuple(held), seed, text)


def function_contexts(*, n: int = 3, shots: int = 16, seed: int = 0, tasks: dict | None = None) -> list[FixedContext]:
    """``n`` rules, each shown by ``shots`` demonstrations. The 8 query x values (never among the demos) are split:
    calibration = 4 singles ``x -> y`` + the 12 ordered chains of two; held out = 4 singles on the other x."""
    task = (tasks or prompt_tasks())["function"]
    out = []
    for i in range(n):
        ex = task.sample(_rng(seed, "function", i), shots, n_queries=8)
        pairs = list(ex.pairs)
        cal_p, held_p = pairs[:4], pairs[4:]
        cal = [make_query([p]) for p in cal_p] + [make_query([a, b]) for a, b in itertools.permutations(cal_p, 2)]
        rule = f"y = x + {(int(held_p[0][1]) - int(held_p[0][0].split()[0])) % task.p} mod {task.p}"
        out.append(_context("function", f"function/{i} ({rule}, {shots} demos)", ex.context, cal,
                            [make_query([p]) for p in held_p], seed))
    return out


def _chains_of_two(rng: np.random.Generator, facts: list, chains: int, seen: set) -> list[Query]:
    """Each fact asked second after ``chains`` random other facts (distinct chains, recorded in ``seen``)."""
    out = []
    for f in facts:
        for _ in range(chains):
            other = facts[int(rng.integers(len(facts)))]
            q = make_query([other, f] if other != f else [f, facts[(facts.index(f) + 1) % len(facts)]])
            if q.text not in seen:
                seen.add(q.text)
                out.append(q)
    return out


FACT_SPLITS = ("recall", "unseen")


def facts_contexts(*, sizes: Sequence[int] = (8, 16, 32), seed: int = 0, chains: int = 3,
                   split: str = "recall") -> list[FixedContext]:
    """One sheet per size k: k distinct keys with random values.

    ``split="recall"`` (default): calibration = every key asked alone and inside ``chains`` random chains of two;
    held out = k chains of three distinct keys, none asked in calibration: every fact was calibrated, but the
    combination and the third answer's position are new (does the adapter hold the sheet, or the calibration
    sequences?). ``split="unseen"``: calibration = the first k/2 keys (alone and in chains), held out = the other
    k/2 keys asked alone: a compressed sheet holds only what it was fitted on (the negative control)."""
    if split not in FACT_SPLITS:
        raise ContextPatchError(f"split must be one of {FACT_SPLITS}, got {split!r}")
    out = []
    for i, k in enumerate(sizes):
        if not 3 <= k <= 32:
            raise ContextPatchError(f"a facts sheet holds 3..32 facts, got {k}")
        rng = _rng(seed, "facts", i)
        keys = rng.choice(32, size=k, replace=False)
        vals = rng.integers(32, size=k)
        facts = [(f"k{a}", f"v{b}") for a, b in zip(keys, vals, strict=True)]
        text = " ".join(f"{a} {b} ;" for a, b in facts)
        cal_f = facts if split == "recall" else facts[: k // 2]
        cal = [make_query([f]) for f in cal_f]
        seen = {q.text for q in cal}
        cal += _chains_of_two(rng, cal_f, chains, seen)
        if split == "recall":
            held = []
            while len(held) < k:
                q = make_query([facts[j] for j in rng.choice(k, size=3, replace=False)])
                if q.text not in seen:
                    seen.add(q.text)
                    held.append(q)
        else:
            held = [make_query([f]) for f in facts[k // 2:]]
        out.append(_context("facts", f"facts/{i} ({k} facts, {split})", text, cal, held, seed))
    return out


INSTRUCTIONS = (("reverse", 0), ("sort", 0), ("caesar 3", 0), ("rotate", 2))


def _digits(rng: np.random.Generator, lo: int, hi: int) -> list[int]:
    return [int(v) for v in rng.integers(10, size=int(rng.integers(lo, hi + 1)))]


def _fresh_pair(rng: np.random.Generator, seen: set, mode: str, task) -> tuple[str, str]:
    """A digit list not drawn before (recorded in ``seen``) and its answer under ``mode``."""
    for _ in range(10_000):
        xs = _digits(rng, task.min_len, task.max_len)
        if tuple(xs) not in seen:
            seen.add(tuple(xs))
            return " ".join(map(str, xs)) + " =>", " ".join(map(str, apply_mode(mode, xs)))
    raise ContextPatchError("ran out of distinct digit lists")


def instruction_contexts(*, modes: Sequence[tuple[str, int]] = INSTRUCTIONS, calibration: int = 64,
                         held_out: int = 64, seed: int = 0, tasks: dict | None = None) -> list[FixedContext]:
    """One context ``mode: M ;`` (+ ``shots`` demonstrations) per (mode, shots); distinct random digit lists
    (the task's lengths) as calibration and held-out queries ``4 1 9 => 9 1 4``. The held-out lists are drawn
    before the calibration lists, so contexts built with another ``calibration`` size share them (and a smaller
    calibration set is a prefix of a larger one)."""
    task = (tasks or prompt_tasks())["instruction"]
    out = []
    for i, (mode, shots) in enumerate(modes):
        if mode not in MODES:
            raise ContextPatchError(f"unknown instruction mode {mode!r}; modes: {', '.join(MODES)}")
        rng = _rng(seed, "instruction", i)
        seen: set[tuple[int, ...]] = set()
        demos = [_fresh_pair(rng, seen, mode, task) for _ in range(shots)]
        text = " ".join([f"mode: {mode} ;"] + [f"{q} {a} ;" for q, a in demos])
        held = [make_query([_fresh_pair(rng, seen, mode, task)]) for _ in range(held_out)]   # first: the same held-
        cal = [make_query([_fresh_pair(rng, seen, mode, task)]) for _ in range(calibration)]  # out set for any size
        out.append(_context("instruction", f"instruction/{i} ({mode}, {shots} demos)", text, cal, held, seed))
    return out


def zoo_contexts(*, seed: int = 0, quick: bool = False, facts_split: str = "recall") -> list[FixedContext]:
    """The benchmark's contexts: 3 function rules, 3 fact sheets (8, 16, 32; ``facts_split``), 4 instructions
    (``quick``: one of each family, smaller query sets)."""
    if quick:
        return (function_contexts(n=1, seed=seed) + facts_contexts(sizes=(8,), seed=seed, split=facts_split) +
                instruction_contexts(modes=INSTRUCTIONS[:1], calibration=16, held_out=16, seed=seed))
    return (function_contexts(n=3, seed=seed) + facts_contexts(seed=seed, split=facts_split) +
            instruction_contexts(seed=seed))


# --- metrics ------------------------------------------------------------------------------------------------
def answer_accuracy(logits: Tensor, queries: Sequence[Query]) -> float:
    """Mean over all answers of greedy exact match from teacher-forced ``logits`` (K, T, V) of the query tokens
    (``logits[k, t]`` predicts token t + 1 of query k)."""
    hits = []
    for k, q in enumerate(queries):
        for s, e in q.answers:
            if s < 1:
                raise ContextPatchError("an answer must follow at least one query token")
            hits.append(bool((logits[k, s - 1: e - 1].argmax(-1).cpu() == q.ids[s:e]).all()))
    return float(np.mean(hits))


def score(logits: Tensor, teacher: Tensor, valid: Tensor, queries: Sequence[Query]) -> dict[str, float]:
    """``kl``, ``top1`` (against ``teacher``) and ``accuracy`` of ``logits`` (K, T, V) over the valid tokens."""
    logits, teacher = logits.detach(), teacher.detach()
    lp, lq = teacher.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[valid]
    top1 = (logits.argmax(-1) == teacher.argmax(-1))[valid].double()
    return {"kl": float(kl.mean()), "top1": float(top1.mean()), "accuracy": answer_accuracy(logits, queries)}


def recovered_share(acc: float, no_context: float, with_context: float) -> float | None:
    """(acc − no_context) / (with_context − no_context); None when the context brings no gain."""
    gain = with_context - no_context
    return None if gain <= 0 else (acc - no_context) / gain


# --- runners ------------------------------------------------------------------------------------------------
Runner = Callable[[Tensor, Tensor], Tensor]   # (ids (K, p+T), positions (K, p+T)) -> logits (K, p+T, V)


def run_queries(model: nn.Module, context: FixedContext, queries: Sequence[Query], *, keep_prefix: int,
                renumber_positions: bool) -> QueryBatch:
    """The context-free batch of ``queries`` (see ``fit_static``'s conventions)."""
    return query_batch(model, context.context_ids, [q.ids for q in queries], keep_prefix, renumber_positions)


def no_context(model: nn.Module) -> Runner:
    def run(ids, pos):
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos).logits
    return run


def with_context(model: nn.Module, context: FixedContext, batch: QueryBatch) -> Tensor:
    """(K, T, V) logits of the query tokens after the whole context (one packed pass)."""
    return teacher_logits(model, context.context_ids, batch)


def evaluate_runner(run: Runner, batch: QueryBatch, teacher: Tensor, queries: Sequence[Query]) -> dict:
    """Score ``run`` on ``batch``: :func:`score` plus ``eval_s`` (the forward pass time)."""
    t0 = time.perf_counter()
    logits = run(batch.ids, batch.pos)[:, batch.p:]
    res = score(logits, teacher, batch.valid, queries)
    res["eval_s"] = time.perf_counter() - t0
    return res


def first_reaching(history: Sequence[dict], key: str, value: float) -> dict | None:
    """The first history row with ``row[key] ≤ value`` (None if never)."""
    return next((h for h in history if h[key] <= value), None)


# --- closed-form choices and diagnostics --------------------------------------------------------------------
def fit_static_cv(model: nn.Module, context: FixedContext, *, ridges: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
                  split: float = 0.25, seed: int = 0, **fit_kw):
    """``fit_static`` with the ridge chosen on the calibration queries alone (no held-out query is looked at):
    fit on a random (1 − ``split``) of them for each ridge, keep the ridge with the lowest KL on the rest, refit on
    all. Returns (adapter, {"ridge", "cv_kl": {ridge: kl}, "fit_s"}); ``fit_s`` includes the selection fits."""
    from ..engine import evaluate_static, fit_static

    if not 0 < split < 1 or not ridges:
        raise ContextPatchError("need 0 < split < 1 and at least one ridge")
    t0 = time.perf_counter()
    cal = [q.ids for q in context.calibration]
    perm = np.random.default_rng([seed, 4099]).permutation(len(cal))
    n_val = max(1, int(round(split * len(cal))))
    if len(ridges) > 1 and len(cal) - n_val < 1:
        raise ContextPatchError("too few calibration queries to choose a ridge")
    val, fit = [cal[i] for i in perm[:n_val]], [cal[i] for i in perm[n_val:]]
    cv = {}
    for r in ridges if len(ridges) > 1 else ():
        st = fit_static(model, context.context_ids, fit, ridge=r, seed=seed, **fit_kw)
        cv[float(r)] = evaluate_static(model, st, context.context_ids, val)["kl"]
    best = min(cv, key=cv.get) if cv else float(ridges[0])
    st = fit_static(model, context.context_ids, cal, ridge=best, seed=seed, **fit_kw)
    return st, {"ridge": best, "cv_kl": cv, "fit_s": time.perf_counter() - t0}


# --- the side-by-side comparison of one context --------------------------------------------------------------
DROP_IN = {"keep_prefix": 1, "renumber_positions": True}     # <bos> QUERY at positions 0..: what a server runs
FITTED = {"keep_prefix": 0, "renumber_positions": False}     # QUERY alone at its with-context positions n..


#: the hybrids of :func:`compare_methods`: LoRA distillation started from the drop-in static adapter of this
#: method at rank ``lora_rank``
HYBRIDS = {"hybrid": "static", "hybrid_attn": "static_attn", "hybrid_cv": "static_rrr",
           "hybrid_shrunk": "static_shrunk"}
#: hybrids trained at distillation's own ``lr`` (their start is far from the optimum); the others use ``hybrid_lr``
_OWN_LR = {"hybrid_shrunk"}


def _rank_key(rank: int | None) -> str:
    return "full" if rank is None else f"r{rank}"


def compare_methods(model: nn.Module, context: FixedContext, *, ranks: Sequence[int | None] = (1, 4, 16, None),
                    lora_rank: int = 4, steps: int = 150, lr: float = 1e-2, hybrid_lr: float = 3e-3,
                    hybrid_mode: str = "factors", hybrid_ridge: float = 1.0,
                    eval_every: int = 5, ridge: float = 1e-3, ridges: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
                    all_linear: bool = True, diagnose: Callable | None = None, output_patch: str = "auto",
                    seed: int = 0) -> dict:
    """Every method on one fixed context, same calibration and held-out queries. Returns a JSON-able dict:

    ``with_context``/``no_context`` (held-out metrics of the two anchors, per query convention), and per method
    the held-out ``kl``, ``top1``, ``accuracy``, ``recovered`` (share of the context's accuracy gain), the same
    on the calibration queries (``calibration_kl``; static adapters also ``calibration_accuracy``) with
    ``fit_s`` / ``history`` (distillation: one row per ``eval_every`` steps with ``wall_s`` and
    ``forward_backward``):

        static/<mode>/<rank>      fit_static defaults (``ridge``, MLP matrices, SVD truncation), mode drop_in/fitted
        static_cv/drop_in/full    ridge chosen on the calibration queries alone (:func:`fit_static_cv`); this and
                                  the variants below use ``output_patch`` (e.g. "weight" for GPT-2's bias slot)
        static_attn/drop_in/<rank>   + attention-output slot, ridge by CV at full rank, reduced-rank truncation
        static_rrr/drop_in/<rank>    MLP only, CV ridge, reduced-rank truncation (isolates the rank method)
        static_attn/fitted/full   the extension at the fitted positions
        distill_mlp, distill_all  LoRA rank ``lora_rank`` on the MLP matrices / all linear layers, drop-in inputs
        hybrid, hybrid_attn       distillation from static/drop_in/r{lora_rank} and static_attn/drop_in/r{lora_rank}
        hybrid_cv                 distillation from static_rrr/drop_in/r{lora_rank} (CV ridge, same matrices as
                                  distill_mlp: the fair hybrid; the default ridge overfits the calibration tokens)
                                  (``hybrid_mode``: ``distill_lora``'s ``init_mode``, "factors" or "residual")
        static_shrunk/drop_in/r{lora_rank}   MLP only, RRR, ridge ``hybrid_ridge`` (strong: λ = mean ‖key‖²) —
                                  a start that does NOT interpolate the calibration tokens
        hybrid_shrunk             distillation from static_shrunk at distillation's own ``lr``: the start moves
                                  toward the context and leaves the gradient that an interpolating start removes
                                  (docs/adapters.md)

    ``diagnose``: a diagnostics function (``adapter_diagnostics.diagnostics``; passed in so that the diagnostics
    module can import this one and not the reverse), adding ``diagnostics``: the context's attention share, and
    per method (static default, CV ridge, + attention, MLP LoRA distillation) the residual mismatch per layer and
    the KL per query-token index on the held-out queries.
    """
    from ..engine import distill_lora, fit_static

    cal = [q.ids for q in context.calibration]
    held = context.held_out
    out: dict = {"context": context.name, "family": context.family, "text": context.text, "seed": context.seed,
                 "extension_output_patch": output_patch,
                 "context_tokens": int(context.context_ids.numel()), "calibration_queries": len(cal),
                 "calibration_tokens": int(sum(q.numel() for q in cal)), "held_out_queries": len(held),
                 "held_out_answers": sum(len(q.answers) for q in held)}
    batches = {m: run_queries(model, context, held, **kw) for m, kw in (("drop_in", DROP_IN), ("fitted", FITTED))}
    teacher = with_context(model, context, batches["drop_in"])
    acc_ctx = answer_accuracy(teacher, held)
    cal_q = context.calibration
    cal_batches = {m: run_queries(model, context, cal_q, **kw) for m, kw in (("drop_in", DROP_IN), ("fitted", FITTED))}
    cal_teacher = with_context(model, context, cal_batches["drop_in"])
    out["with_context"] = {"accuracy": acc_ctx, "calibration_accuracy": answer_accuracy(cal_teacher, cal_q)}
    out["no_context"] = {m: evaluate_runner(no_context(model), b, teacher, held) for m, b in batches.items()}
    acc_none = out["no_context"]["drop_in"]["accuracy"]

    def measure(static, mode: str, fit_s: float, **extra) -> dict:
        with static.applied(model):
            res = evaluate_runner(no_context(model), batches[mode], teacher, held)
            cal = evaluate_runner(no_context(model), cal_batches[mode], cal_teacher, cal_q)
        res.update(calibration_kl=cal["kl"], calibration_accuracy=cal["accuracy"])
        res.update(fit_s=fit_s, recovered=recovered_share(res["accuracy"], acc_none, acc_ctx),
                   bytes=static.nbytes(), **extra)
        return res

    def timed_fit(**kw):
        t0 = time.perf_counter()
        st = fit_static(model, context.context_ids, cal, seed=seed, **kw)
        return st, time.perf_counter() - t0

    keep: dict = {}
    diag: dict = {}
    out["static"] = {}
    for mode, kw in (("drop_in", DROP_IN), ("fitted", FITTED)):
        out["static"][mode] = {}
        for r in ranks:
            st, t = timed_fit(ridge=ridge, rank=r, **kw)
            out["static"][mode][_rank_key(r)] = measure(st, mode, t, ridge=ridge)
            keep[("static", mode, r)] = st
    st, info = fit_static_cv(model, context, ridges=ridges, seed=seed, output_patch=output_patch, **DROP_IN)
    out["static_cv"] = {"drop_in": {"full": measure(st, "drop_in", info["fit_s"], ridge=info["ridge"],
                                                    cv_kl=info["cv_kl"])}}
    keep[("static_cv", "drop_in", None)] = st
    st, info = fit_static_cv(model, context, ridges=ridges, seed=seed, attention=True, output_patch=output_patch,
                             **DROP_IN)
    best = info["ridge"]
    out["static_attn"] = {"drop_in": {"full": measure(st, "drop_in", info["fit_s"], ridge=best, cv_kl=info["cv_kl"])}}
    keep[("static_attn", "drop_in", None)] = st
    out["static_rrr"] = {"drop_in": {}}
    ridge_mlp = out["static_cv"]["drop_in"]["full"]["ridge"]
    for r in ranks:
        if r is None:
            continue
        st, t = timed_fit(ridge=best, rank=r, attention=True, rank_method="rrr", output_patch=output_patch, **DROP_IN)
        out["static_attn"]["drop_in"][_rank_key(r)] = measure(st, "drop_in", t, ridge=best)
        keep[("static_attn", "drop_in", r)] = st
        st, t = timed_fit(ridge=ridge_mlp, rank=r, rank_method="rrr", output_patch=output_patch, **DROP_IN)
        out["static_rrr"]["drop_in"][_rank_key(r)] = measure(st, "drop_in", t, ridge=ridge_mlp)
        keep[("static_rrr", "drop_in", r)] = st
    st, t = timed_fit(ridge=best, attention=True, output_patch=output_patch, **FITTED)
    out["static_attn"]["fitted"] = {"full": measure(st, "fitted", t, ridge=best)}
    st, t = timed_fit(ridge=hybrid_ridge, rank=lora_rank, rank_method="rrr", output_patch=output_patch, **DROP_IN)
    out["static_shrunk"] = {"drop_in": {_rank_key(lora_rank): measure(st, "drop_in", t, ridge=hybrid_ridge)}}
    keep[("static_shrunk", "drop_in", lora_rank)] = st

    def metrics(logits: Tensor) -> dict:
        return {"accuracy": answer_accuracy(logits, held)}

    def distill(name: str, **kw) -> None:
        res = distill_lora(model, context.context_ids, cal, [q.ids for q in held], rank=lora_rank, steps=steps,
                           eval_every=eval_every, seed=seed, eval_metrics=metrics, **kw)
        if diagnose is not None and name == "distill_mlp":
            diag["distill_mlp"] = res.model
        last = dict(res.history[-1])
        last["recovered"] = recovered_share(last["accuracy"], acc_none, acc_ctx)
        out[name] = {"final": last, "history": res.history, "config": res.config}

    distill("distill_mlp", targets="mlp", lr=lr, **DROP_IN)
    if all_linear:
        distill("distill_all", targets="all-linear", lr=lr, **DROP_IN)
    for name, start in HYBRIDS.items():
        if (start, "drop_in", lora_rank) in keep:
            distill(name, init=keep[(start, "drop_in", lora_rank)], lr=lr if name in _OWN_LR else hybrid_lr,
                    init_mode=hybrid_mode)
    out["bars"] = context_bars(out, lora_rank=lora_rank)
    if diagnose is not None:
        out["diagnostics"] = diagnose(model, context, batches["drop_in"], teacher, {
            "static": keep[("static", "drop_in", None)] if ("static", "drop_in", None) in keep else None,
            "static_cv": keep[("static_cv", "drop_in", None)], "static_attn": keep[("static_attn", "drop_in", None)],
            "distill_mlp": diag.get("distill_mlp")})
    return out


def context_bars(res: dict, *, lora_rank: int = 4) -> dict:
    """The issue's bars on one context's :func:`compare_methods` result:

    ``speedup[<static>]``: wall time distillation (MLP LoRA) needs to first reach the static adapter's held-out
    KL, over the static fit time (``reached`` False: never reached; the ratio is then a lower bound from the
    last step); ``hybrid_steps``: the first step at which the hybrid reaches distillation's final KL, over
    distillation's steps (None: never); ``recovered``: the static adapters' share of the accuracy gain."""
    d = res["distill_mlp"]
    bars: dict = {"speedup": {}, "recovered": {}}
    for key, (meth, mode, rk) in {"static": ("static", "drop_in", "full"),
                                  "static_attn": ("static_attn", "drop_in", "full"),
                                  f"static_attn_r{lora_rank}": ("static_attn", "drop_in", f"r{lora_rank}")}.items():
        s = res.get(meth, {}).get(mode, {}).get(rk)
        if s is None:
            continue
        hit = first_reaching(d["history"], "kl", s["kl"])
        wall = hit["wall_s"] if hit else d["history"][-1]["wall_s"]
        bars["speedup"][key] = {"static_kl": s["kl"], "static_s": s["fit_s"], "distill_s": wall,
                                "distill_step": hit["step"] if hit else None, "reached": hit is not None,
                                "ratio": wall / s["fit_s"]}
        bars["recovered"][key] = s["recovered"]
    for name in HYBRIDS:
        if name in res:
            target, total = d["final"]["kl"], d["final"]["step"]
            hit = first_reaching(res[name]["history"], "kl", target)
            bars[name + "_steps"] = {"distill_final_kl": target, "step": hit["step"] if hit else None,
                                     "fraction": hit["step"] / total if hit and total else None}
    return bars


def calibration_sweep(model: nn.Module, *, sizes: Sequence[int] = (16, 64, 256), seed: int = 0,
                      modes: Sequence[tuple[str, int]] = INSTRUCTIONS,
                      ridges: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0), output_patch: str = "auto") -> list[dict]:
    """Static adapters (drop-in, full rank, ridge by CV; MLP only and + attention slot) of each instruction context
    fitted on ``sizes`` calibration queries, measured on the SAME held-out queries. One row per (context, size)."""
    rows = []
    for K in sizes:
        for c in instruction_contexts(modes=modes, calibration=K, held_out=64, seed=seed):
            batch = run_queries(model, c, c.held_out, **DROP_IN)
            teacher = with_context(model, c, batch)
            acc_c = answer_accuracy(teacher, c.held_out)
            acc_n = evaluate_runner(no_context(model), batch, teacher, c.held_out)["accuracy"]
            row = {"context": c.name, "calibration_queries": K, "calibration_tokens": int(sum(q.ids.numel() for q in
                                                                                              c.calibration)),
                   "with_context": acc_c, "no_context": acc_n}
            for name, att in (("static_cv", False), ("static_attn", True)):
                st, info = fit_static_cv(model, c, ridges=ridges, seed=seed, attention=att, output_patch=output_patch,
                                         **DROP_IN)
                with st.applied(model):
                    res = evaluate_runner(no_context(model), batch, teacher, c.held_out)
                res.update(ridge=info["ridge"], fit_s=info["fit_s"], recovered=recovered_share(res["accuracy"], acc_n,
                                                                                              acc_c))
                row[name] = res
            rows.append(row)
    return rows
