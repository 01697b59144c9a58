"""Which tokens are context and which the context-free pass keeps, per row, and at which positions.

Shapes: B rows, T tokens in the full (with-context) sequence, T_q kept ("query") tokens per row
(rows with fewer kept tokens are right-padded; ``valid`` marks the real ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import ContextPatchError

__all__ = ["QueryLayout", "make_layout", "ContextSpec"]

ContextSpec = int | tuple[int, int] | slice | Tensor | list | None


@dataclass(frozen=True)
class QueryLayout:
    """The map from the full sequence to the context-free pass.

    Attributes:
        context_mask: (B, T) bool, True where the token is context (removed in the context-free pass).
        index: (B, T_q) long, position in the full sequence of each kept token (padding repeats the last one).
        valid: (B, T_q) bool, False on padding slots.
        full_position_ids: (B, T) long, position ids of the with-context pass.
        position_ids: (B, T_q) long, position ids of the context-free pass (original ones, or 0..T_q−1).
        query_ids: (B, T_q) long, the kept token ids.
    """

    context_mask: Tensor
    index: Tensor
    valid: Tensor
    full_position_ids: Tensor
    position_ids: Tensor
    query_ids: Tensor

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (B, T_q, ...) at the kept positions (on x's device)."""
        idx = self.index.to(x.device)
        idx = idx.view(idx.shape + (1,) * (x.dim() - 2)).expand(idx.shape + x.shape[2:])
        return x.gather(1, idx)

    @property
    def attention_mask(self) -> Tensor | None:
        """(B, T_q) mask for the context-free pass, or None when no row is padded."""
        return None if bool(self.valid.all()) else self.valid.long()


def _to_mask(spec, B: int, T: int, what: str, device) -> Tensor | None:
    if spec is None:
        return None
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    if isinstance(spec, bool):
        raise ContextPatchError(f"{what} must be a token count, a (start, end) span or a boolean mask, not a bool")
    if isinstance(spec, int):
        if not 0 <= spec <= T:
            raise ContextPatchError(f"{what}={spec} is outside the sequence length {T}")
        m[:, :spec] = True
        return m
    if isinstance(spec, slice):
        m[:, spec] = True
        return m
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) for v in spec):
        a, b = spec
        if not 0 <= a <= b <= T:
            raise ContextPatchError(f"{what} span {spec} is not within [0, {T}] with start ≤ end")
        m[:, a:b] = True
        return m
    t = torch.as_tensor(spec, device=device)
    if t.dtype != torch.bool:
        raise ContextPatchError(f"{what} mask must be boolean, got dtype {t.dtype} (use an int or a (start, end) span)")
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(B, -1)
    if tuple(t.shape) != (B, T):
        raise ContextPatchError(f"{what} mask has shape {tuple(t.shape)} but input_ids has shape {(B, T)}")
    return t.clone()


def make_layout(input_ids: Tensor, context: ContextSpec = None, *, query: ContextSpec = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                bos_is_context: bool = True, renumber_positions: bool = False) -> QueryLayout:
    """Resolve ``context`` / ``query`` into a :class:`QueryLayout`.

    * ``context`` given: those tokens are removed; every other (non-padding) token is kept.
    * only ``query`` given: the context is every other token (for a causal model with the query at the end:
      every position before the query).
    * neither: the last token is the query, everything before it is context.
    * ``bos_is_context=False``: the first (non-padding) token of each row is never context (kept instead).
    * ``renumber_positions=True``: kept tokens get positions 0..T_q−1 instead of their original ones.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ContextPatchError("input_ids must be an integer tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ContextPatchError(f"input_ids must have shape (B, T) with T ≥ 1, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    dev = input_ids.device
    am = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.to(dev).bool()
    if tuple(am.shape) != (B, T):
        raise ContextPatchError(f"attention_mask has shape {tuple(am.shape)}, input_ids {(B, T)}")
    ctx = _to_mask(context, B, T, "context", dev)
    qry = _to_mask(query, B, T, "query", dev)
    if ctx is None and qry is None:
        last = am.long().cumsum(1).argmax(1)                       # last non-padding token
        qry = torch.zeros_like(am)
        qry[torch.arange(B, device=dev), last] = True
    if ctx is None:
        ctx = ~qry
    elif qry is not None and bool((ctx & qry & am).any()):
        raise ContextPatchError("context and query overlap: a token cannot be both")
    ctx = ctx & am
    if not bos_is_context:
        first = am.long().argmax(1)
        ctx[torch.arange(B, device=dev), first] = False
    kept = am & ~ctx
    n_ctx, n_kept = ctx.sum(1), kept.sum(1)
    if bool((n_ctx == 0).any()):
        raise ContextPatchError(f"empty context in row(s) {torch.nonzero(n_ctx == 0).flatten().tolist()}: "
                                "nothing to turn into patches")
    if bool((n_kept == 0).any()):
        raise ContextPatchError(f"empty query in row(s) {torch.nonzero(n_kept == 0).flatten().tolist()}: "
                                "every token is context")
    Tq = int(n_kept.max())
    # stable sort puts kept positions first, in order
    order = torch.sort((~kept).long(), dim=1, stable=True).indices[:, :Tq]
    valid = torch.arange(Tq, device=dev).unsqueeze(0) < n_kept.unsqueeze(1)
    last_kept = order.gather(1, (n_kept - 1).unsqueeze(1))
    index = torch.where(valid, order, last_kept)
    if position_ids is not None:
        full_pos = position_ids.to(dev).long().expand(B, T)
    elif attention_mask is not None:
        full_pos = (am.long().cumsum(1) - 1).clamp_min(0)
    else:
        full_pos = torch.arange(T, device=dev).unsqueeze(0).expand(B, T)
    pos = torch.arange(Tq, device=dev).unsqueeze(0).expand(B, Tq) if renumber_positions else full_pos.gather(1, index)
    return QueryLayout(context_mask=ctx, index=index, valid=valid, full_position_ids=full_pos.contiguous(),
                       position_ids=pos.contiguous(), query_ids=input_ids.gather(1, index))
