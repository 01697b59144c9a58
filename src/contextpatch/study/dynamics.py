"""Implicit dynamics over the demonstrations of a function-induction prompt, and explicit fine-tuning next to it
(issue 9 §3; the paper's §3.2 / Fig. 2 protocol, here on a language model instead of the regression toy).

A prompt is ``<bos> d_1 … d_k x ->`` with demonstrations ``d_j = "x_j -> y_j ;"`` (4 tokens) of a noisy shift
rule; the answer ``y = rule(x)`` follows ``->``. For every prefix of ``i = 1..k`` demonstrations, ONE batched
``engine.extract`` (per-row context masks, right padding) gives the exact patches of the context-free input
``<bos> x ->`` at positions 0, 1, 2 (``bos_is_context=False, renumber_positions=True``). For each layer, the
paper's W is the first matrix reading the MLP input (Llama ``gate_proj``, GPT-2 ``c_fc``) and

    ΔW_i = u_i v_iᵀ            the rank-1 patch at the query's last token ``->`` (ΔW_0 = 0: no context)
    ‖ΔW_i‖_F / ‖W‖_F           how far the context has moved W
    ‖ΔW_i − ΔW_{i−1}‖_F / ‖W‖_F the implicit update of demonstration i

Differences are exact from the Gram formula ‖u₁v₁ᵀ − u₀v₀ᵀ‖² = ‖u₁‖²‖v₁‖² + ‖u₀‖²‖v₀‖² − 2(u₁·u₀)(v₁·v₀).
Loss and accuracy after i demonstrations come from a plain forward pass of the prompt truncated after d_i
(equal to the patched output, which the exactness study checks).

**Explicit fine-tuning** (the comparison): from the trained weights, online SGD on the first MLP matrix of every
layer, one demonstration per step in prompt order: the input ``<bos> x_i -> y_i`` (positions 0..3), loss
−log p(y_i | ``<bos> x_i ->``), ``W ← W − η ∇_W``. η is picked from a grid by the lowest mean query loss after
all k steps on separate tuning prompts. Per layer and step the normalized Frobenius inner product
⟨A, B⟩/(‖A‖‖B‖) of the SGD step with the implicit increment ΔW_i − ΔW_{i−1}, and cumulatively of W_i^SGD − W
with ΔW_i; the query loss −log p(y | ``<bos> x ->``) after each step next to the with-context loss.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import get_adapter
from ..engine import extract
from ..zoo.tokenizer import BOS, encode_words
from .prompts import make_prompts

__all__ = ["prefix_batch", "implicit_dynamics", "explicit_finetune", "LRS"]

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _demo_tokens(prompt) -> tuple[list[list[int]], list[int], int, list[bool]]:
    ex = prompt.example
    demos = [encode_words(f"{q} {a} ;", bos=False) for q, a, _ in ex.demos]
    q, a = ex.pairs[0]
    return demos, encode_words(q, bos=False), encode_words(a, bos=False)[0], [c for _, _, c in ex.demos]


def prefix_batch(prompt) -> tuple[Tensor, Tensor, Tensor]:
    """Rows i = 1..k: ``<bos> d_1..d_i x ->`` right-padded; returns (ids, attention_mask, context_mask)."""
    demos, q, _, _ = _demo_tokens(prompt)
    rows = [[BOS] + sum(demos[:i], []) + q for i in range(1, len(demos) + 1)]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    cm = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
        cm[i, 1: len(r) - len(q)] = True
    return ids, am, cm


def _first(layer) -> tuple[str, Tensor, Tensor]:
    name, W = next(iter(layer.inputs.items()))
    return name, W.U[:, -1, :, 0].double(), W.V[:, -1, :, 0].double()          # (k, d_out), (k, d_in)


@torch.no_grad()
def _answer_nll(model: nn.Module, ids: Tensor, am: Tensor | None, answer: int) -> Tensor:
    """−log p(answer) at each row's last real token."""
    logits = model(input_ids=ids, attention_mask=am).logits
    last = (am.sum(1) - 1) if am is not None else torch.full((ids.shape[0],), ids.shape[1] - 1)
    lp = logits[torch.arange(ids.shape[0]), last].double().log_softmax(-1)
    return -lp[:, answer]


def _prompt_dynamics(model: nn.Module, prompt, weight_norms: list[float]) -> dict:
    ids, am, cm = prefix_batch(prompt)
    P = extract(model, ids, context=cm, attention_mask=am, bos_is_context=False, renumber_positions=True)
    demos, q, ans, clean = _demo_tokens(prompt)
    patch, step, us, vs = [], [], [], []
    for li, layer in enumerate(P.layers):
        _, u, v = _first(layer)
        nu, nv = u.norm(dim=1), v.norm(dim=1)
        p = nu * nv
        cross = (u[1:] * u[:-1]).sum(1) * (v[1:] * v[:-1]).sum(1)
        d = (p[1:] ** 2 + p[:-1] ** 2 - 2 * cross).clamp_min(0).sqrt()
        patch.append((p / weight_norms[li]).tolist())
        step.append((torch.cat([p[:1], d]) / weight_norms[li]).tolist())
        us.append(u)
        vs.append(v)
    nll0 = _answer_nll(model, torch.tensor([[BOS] + q]), None, ans)
    nll = torch.cat([nll0, _answer_nll(model, ids, am, ans)])
    # accuracy: greedy answer right (one token)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
        last = am.sum(1) - 1
        hit = logits[torch.arange(ids.shape[0]), last].argmax(-1) == ans
        hit0 = model(input_ids=torch.tensor([[BOS] + q])).logits[0, -1].argmax(-1) == ans
    return {"patch": patch, "step": step, "nll": nll.tolist(), "hit": [bool(hit0)] + hit.tolist(), "clean": clean,
            "u": us, "v": vs}


def _weight_norms(model: nn.Module) -> tuple[list[str], list[float], list[Tensor]]:
    adapter = get_adapter(model)
    names, norms, mods = [], [], []
    full = {id(m): n for n, m in model.named_modules()}
    for b in adapter.resolve(model):
        name, mod = next(iter(b.inputs.items()))
        names.append(full[id(mod)])
        norms.append(float(mod.weight.detach().double().norm()))
        mods.append(mod)
    return names, norms, mods


def implicit_dynamics(model: nn.Module, *, n: int = 32, shots: int = 32, seed: int = 0, progress=None) -> dict:
    """Per-layer implicit patch and update norms over i = 0..k demonstrations (mean over ``n`` prompts), the
    with-context accuracy and answer loss after i demonstrations, the update of noisy vs clean demonstrations,
    and the update of a demonstration when the answer is already right before it vs when it is not (does the
    implicit update shrink once the answer is right?)."""
    names, norms, _ = _weight_norms(model)
    runs = []
    for p in make_prompts("function", n, shots, seed=seed):
        r = _prompt_dynamics(model, p, norms)
        r.pop("u"), r.pop("v")
        runs.append(r)
        if progress is not None:
            progress(1)
    patch = np.array([r["patch"] for r in runs])          # (n, L, k)
    step = np.array([r["step"] for r in runs])            # (n, L, k)
    clean = np.array([r["clean"] for r in runs])          # (n, k)
    L = patch.shape[1]
    noisy_ratio = [float(step[:, li][~clean].mean() / step[:, li][clean].mean()) if (~clean).any() else None
                   for li in range(L)]
    late, early = step[:, :, shots // 2:].mean((0, 2)), step[:, :, :4].mean((0, 2))
    right = np.array([r["hit"] for r in runs])[:, :-1]    # (n, k): answer right BEFORE demonstration i+1
    by_right = [float(step[:, li][right].mean() / step[:, li][~right].mean()) if right.any() and (~right).any()
                else None for li in range(L)]
    return {"matrices": names, "weight_norms": norms, "shots": list(range(shots + 1)), "prompts": n,
            "seed": seed,
            "accuracy": np.array([r["hit"] for r in runs]).mean(0).tolist(),
            "answer_nll": np.array([r["nll"] for r in runs]).mean(0).tolist(),
            "patch_rel": [[0.0] + patch[:, li].mean(0).tolist() for li in range(L)],
            "step_rel": [step[:, li].mean(0).tolist() for li in range(L)],
            "step_late_over_early": (late / early).tolist(),
            "noisy_over_clean_step": noisy_ratio,
            "step_when_right_over_wrong": by_right,
            "noisy_fraction": float(1 - clean.mean())}


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan


def _sgd_run(model: nn.Module, prompt, lr: float, mods_idx: list[str]) -> tuple[list[float], list[list[Tensor]]]:
    """Online SGD over the prompt's demonstrations; returns the query NLL after 0..k steps and the per-layer
    SGD steps (dense, float64)."""
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(False)
    named = dict(student.named_modules())
    mods = [named[n] for n in mods_idx]
    conv1d = get_adapter(model).conv1d
    for m in mods:
        m.weight.requires_grad_(True)
    demos, q, ans, _ = _demo_tokens(prompt)
    query = torch.tensor([[BOS] + q])
    nll = [float(_answer_nll(student, query, None, ans)[0])]
    steps: list[list[Tensor]] = [[] for _ in mods]
    for d in demos:
        ids = torch.tensor([[BOS] + d[:3]])                       # <bos> x -> y
        logits = student(input_ids=ids).logits[0, -2]
        loss = -logits.float().log_softmax(-1)[ids[0, -1]]
        grads = torch.autograd.grad(loss, [m.weight for m in mods])
        with torch.no_grad():
            for li, (m, g) in enumerate(zip(mods, grads, strict=True)):
                m.weight -= lr * g
                s = -lr * g.double()
                steps[li].append(s.T if conv1d else s)
        nll.append(float(_answer_nll(student, query, None, ans)[0]))
    return nll, steps


def explicit_finetune(model: nn.Module, *, n: int = 16, n_tune: int = 8, shots: int = 16, seed: int = 0,
                      lrs=LRS, progress=None) -> dict:
    """Explicit online SGD vs the implicit increments (module docstring): η chosen on ``n_tune`` prompts, then
    query-loss curves and per-layer alignments (mean over ``n`` test prompts)."""
    names, norms, _ = _weight_norms(model)
    tune = make_prompts("function", n_tune, shots, seed=seed + 1000)
    final = {}
    for lr in lrs:
        final[lr] = float(np.mean([_sgd_run(model, p, lr, names)[0][-1] for p in tune]))
        if progress is not None:
            progress(1)
    finite = {k: v for k, v in final.items() if math.isfinite(v)}
    best = min(finite, key=finite.get)
    sgd_nll, ctx_nll, align_step, align_cum = [], [], [], []
    for p in make_prompts("function", n, shots, seed=seed):
        nll, steps = _sgd_run(model, p, best, names)
        r = _prompt_dynamics(model, p, norms)
        sgd_nll.append(nll)
        ctx_nll.append(r["nll"])
        a_s, a_c = [], []
        for li in range(len(names)):
            u, v = r["u"][li], r["v"][li]
            dW = [torch.zeros(u.shape[1], v.shape[1], dtype=torch.float64)] + \
                 [torch.outer(u[i], v[i]) for i in range(u.shape[0])]
            cum = torch.zeros_like(dW[0])
            s_row, c_row = [], []
            for i, s in enumerate(steps[li], start=1):
                cum = cum + s
                s_row.append(_cos(s, dW[i] - dW[i - 1]))
                c_row.append(_cos(cum, dW[i]))
            a_s.append(s_row)
            a_c.append(c_row)
        align_step.append(a_s)
        align_cum.append(a_c)
        if progress is not None:
            progress(1)
    a_s, a_c = np.array(align_step), np.array(align_cum)       # (n, L, k)
    return {"alignment_undefined": int(np.isnan(a_s).sum()),    # steps where an update was exactly zero
            "matrices": names, "prompts": n, "tune_prompts": n_tune, "shots": shots, "seed": seed,
            "lr_grid": {str(k): v for k, v in final.items()}, "lr": best,
            "query_nll_sgd": np.mean(sgd_nll, 0).tolist(), "query_nll_with_context": np.mean(ctx_nll, 0).tolist(),
            "alignment_step": _nanmean(a_s, 0), "alignment_cumulative": _nanmean(a_c, 0),
            "alignment_step_mean": _nanmean(a_s, (0, 2)),
            "alignment_step_positive_share": float((a_s > 0).sum() / max(1, (~np.isnan(a_s)).sum())),
            "alignment_cumulative_final": _nanmean(a_c[:, :, -1], 0)}


def _nanmean(x: np.ndarray, axis) -> list:
    """Mean over ``axis`` ignoring undefined (NaN: a zero-norm update) entries; None where every entry is
    undefined (never a NaN in metrics.json)."""
    defined = ~np.isnan(x)
    count = defined.sum(axis)
    mean = np.where(defined, x, 0.0).sum(axis) / np.maximum(count, 1)
    return np.where(count > 0, mean, None).tolist()
