"""Greedy generation from the query alone, patches recomputed for every new token (Goldwaser §4).

Two KV caches advance in lockstep:

    with-context side   [context ; query ; generated]  -> targets (z_C, r_C) of the newest token only
    context-free side   [query ; generated]            -> patched pass of the newest token only

The context-free cache holds the keys/values of already patched tokens, which equal the with-context ones,
so each step runs one token per side. The next token is the argmax of the *patched* logits; the with-context
argmax is recorded for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from ._extract import prepare_inputs
from ._layout import ContextSpec, make_layout
from ._model import check_positions
from ._records import LayerPatch, OutputPatch
from ._step1_capture import capture_targets
from ._step2_patched import patched_pass

__all__ = ["GenerationResult", "generate"]


@dataclass
class GenerationResult:
    """tokens: (B, n) generated without the context; reference_tokens: (B, n) with-context argmax on the same
    history; max_abs_diff: per step max |patched − with-context| over the vocabulary and rows."""

    tokens: Tensor
    reference_tokens: Tensor
    max_abs_diff: list[float]
    step_patches: list[list[LayerPatch]] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return bool((self.tokens == self.reference_tokens).all())


def generate(model: nn.Module, input_ids: Tensor, context: ContextSpec = None, *, query: ContextSpec = None,
             max_new_tokens: int = 20, bos_is_context: bool = True, renumber_positions: bool = False,
             output_patch: str | OutputPatch = "auto", tol: float | None = None,
             keep_patches: bool = False) -> GenerationResult:
    """Greedy decoding from the kept (query) tokens only, each new token patched on the fly.

    Rows must be unpadded and have the same number of kept tokens (e.g. ``context`` = a count).
    """
    adapter, input_ids = prepare_inputs(model, input_ids, None)
    if not adapter.causal:
        raise ContextPatchError(f"{adapter.name} is not a causal language model: nothing to generate")
    if max_new_tokens < 1:
        raise ContextPatchError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    dev = input_ids.device
    layout = make_layout(input_ids, context, query=query, bos_is_context=bos_is_context,
                         renumber_positions=renumber_positions)
    check_positions(model, int(layout.full_position_ids.max()) + max_new_tokens)
    if not bool(layout.valid.all()):
        raise ContextPatchError("generation needs the same number of kept tokens in every row")
    B = input_ids.shape[0]
    cap = capture_targets(model, input_ids, layout.index, adapter=adapter, position_ids=layout.full_position_ids,
                          use_cache=True)
    res = patched_pass(model, layout.query_ids, cap.targets, adapter=adapter, position_ids=layout.position_ids,
                       use_cache=True, output_patch=output_patch, tol=tol)
    pos_full = layout.full_position_ids[:, -1:]
    pos_q = layout.position_ids[:, -1:]
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    toks, refs, diffs, steps = [], [], [], []
    for step in range(max_new_tokens):
        logits_p, logits_c = res.output[:, -1], cap.output[:, -1]
        nxt = logits_p.argmax(-1, keepdim=True)
        toks.append(nxt)
        refs.append(logits_c.argmax(-1, keepdim=True))
        diffs.append(float((logits_p.double() - logits_c.double()).abs().max()))
        if keep_patches:
            steps.append(res.layers)
        if step == max_new_tokens - 1:
            break
        pos_full, pos_q = pos_full + 1, pos_q + 1
        cap = capture_targets(model, nxt, zero, adapter=adapter, position_ids=pos_full,
                              past_key_values=cap.past_key_values, use_cache=True)
        res = patched_pass(model, nxt, cap.targets, adapter=adapter, position_ids=pos_q,
                           past_key_values=res.past_key_values, use_cache=True, output_patch=output_patch,
                           tol=tol)
    return GenerationResult(torch.cat(toks, 1), torch.cat(refs, 1), diffs, steps)
