"""Exact patches on a zoo model that uses its context (issue 9 §2).

For each family, ``n`` held-out prompts ``<bos> CONTEXT QUERY ANSWER`` (``study.prompts``):

* **verify**: ``engine.verify(model, ids, context=(1, n_ctx), bos_is_context=False)`` compares the patched
  context-free logits of ``<bos> QUERY ANSWER`` with a plain forward pass of the whole prompt; reported as the
  max over prompts of max |Δlogit|, next to the unpatched control (what the context changes).
* **generation**: greedy decoding of the answer from ``<bos> QUERY`` with patches recomputed per new token
  (``engine.generate``), against ``model.generate`` on the whole prompt (HF's own greedy decoding, an independent
  reference): the share of prompts whose generated answers agree token for token, and the exact-answer accuracy
  of both, next to the context-free model's accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine import generate, verify
from .prompts import make_prompts

__all__ = ["exactness"]

SHOTS = {"function": 16, "facts": 16, "instruction": 4}


@torch.no_grad()
def _hf_greedy(model: nn.Module, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[0, ids.numel():]


def exactness(model: nn.Module, *, n: int = 100, n_float64: int = 10, seed: int = 0, families=None,
              progress=None) -> dict:
    """Verification and generation agreement per family (numbers described in the module docstring).

    ``n_float64``: prompts per family also verified on a float64 copy of the model. ``progress(k)``: called
    after each prompt.
    """
    import copy

    fams = families or tuple(SHOTS)
    m64 = copy.deepcopy(model).double() if n_float64 else None
    out = {}
    for fam in fams:
        prompts = make_prompts(fam, n, SHOTS[fam], seed=seed)
        worst, control, worst64, agree, acc_ctx, acc_patched, acc_free = 0.0, float("inf"), 0.0, 0, 0, 0, 0
        for i, p in enumerate(prompts):
            v = verify(model, p.ids[None], context=p.context, bos_is_context=False)
            worst, control = max(worst, v.max_abs_diff), min(control, v.control_max_abs_diff)
            if i < n_float64:
                worst64 = max(worst64, verify(m64, p.ids[None], context=p.context, bos_is_context=False).max_abs_diff)
            m = p.answer_ids.numel()
            head = p.ids[: p.answer_start]
            ref = _hf_greedy(model, head, m)
            g = generate(model, head[None], context=p.context, bos_is_context=False, max_new_tokens=m)
            mine = g.tokens[0]
            free = _hf_greedy(model, torch.cat([head[:1], head[p.context_end:]]), m)
            agree += bool((mine == ref).all())
            acc_ctx += bool((ref == p.answer_ids).all())
            acc_patched += bool((mine == p.answer_ids).all())
            acc_free += bool((free == p.answer_ids).all())
            if progress is not None:
                progress(1)
        out[fam] = {"prompts": n, "shots": SHOTS[fam], "verify_max_abs_diff_float32": worst,
                    "verify_control_min_max_abs_diff": control, "float64_prompts": min(n, n_float64),
                    "verify_max_abs_diff_float64": worst64 if n_float64 else None,
                    "generation_agreement": agree / n, "accuracy_with_context": acc_ctx / n,
                    "accuracy_patched_without_context": acc_patched / n, "accuracy_without_context": acc_free / n}
    return out
