"""Independent references for parity tests: a plain, hook-free forward pass of the HF model, read at kept
positions computed here from the test's own context spec (never from the engine's layout code)."""

from __future__ import annotations

import torch


def kept_positions(context, B: int, T: int, bos_kept: bool = False) -> list[list[int]]:
    """The kept (non-context) positions of each row of a (B, T) input, from the context spec."""
    rows = []
    for b in range(B):
        if isinstance(context, int):
            ctx = set(range(context))
        elif isinstance(context, tuple):
            ctx = set(range(*context))
        elif isinstance(context, slice):
            ctx = set(range(T)[context])
        else:
            m = context if context.dim() == 1 else context[b]
            ctx = {i for i in range(T) if bool(m[i])}
        if bos_kept:
            ctx.discard(0)
        rows.append([i for i in range(T) if i not in ctx])
    return rows


def plain_output(model, input_ids, **kw):
    """The model's own output on the full input: logits for LMs, final hidden states otherwise."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def reference(model, input_ids, kept, **kw):
    """Plain with-context output at ``kept`` (per row, right-padded by repeating the last kept position)."""
    out = plain_output(model, input_ids, **kw)
    n = max(len(k) for k in kept)
    idx = torch.tensor([k + [k[-1]] * (n - len(k)) for k in kept])
    return out.gather(1, idx.unsqueeze(-1).expand(idx.shape + out.shape[-1:]))


def valid_mask(kept) -> torch.Tensor:
    n = max(len(k) for k in kept)
    return torch.tensor([[j < len(k) for j in range(n)] for k in kept])


def max_diff(a, b, valid) -> float:
    """Max |a − b| over the valid (row, token) slots, in float64; NaN anywhere valid counts as inf."""
    d = (a.double() - b.double()).abs().amax(-1)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(torch.where(valid, d, torch.zeros_like(d)).max())
