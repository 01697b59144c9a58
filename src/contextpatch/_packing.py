"""Pack many (context prefix, query) rows into ONE causal sequence with a custom 4-D attention mask.

A causal context token never sees later tokens, so the context's keys and values are the same for every
query and every prefix. Instead of one forward pass per row, all rows share one pass over

    [c_1 … c_n | q^(1) | q^(2) | … | q^(R)]

where the tokens of row r attend to the context prefix c_1..c_{p_r} and causally to their own block only.
This is the KV-cache reuse of the context written as a mask, which HF models accept as a 4-D
``attention_mask`` (returned as-is by ``transformers.masking_utils``). Each block keeps its own position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import ContextPatchError

__all__ = ["Packed", "pack_rows", "additive_mask"]


@dataclass(frozen=True)
class Packed:
    """A packed sequence. input_ids, position_ids: (1, L); allowed: (L, L) bool (query i may see key j);
    row_positions: (R, T) indices into the packed sequence of each row's query tokens, T = the longest query
    (a shorter row repeats its last index); valid: (R, T) bool, False on those repeated slots."""

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    row_positions: Tensor
    valid: Tensor

    def mask(self, dtype: torch.dtype) -> Tensor:
        """The additive float mask (1, 1, L, L): 0 where allowed, the dtype's minimum elsewhere."""
        return additive_mask(self.allowed, dtype)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, L) bool -> (1, 1, L, L) float mask for eager attention (0 = attend, finfo.min = blocked)."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return m.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def pack_rows(context_ids: Tensor, queries: list[Tensor], prefix_lengths: list[int], *,
              query_positions: str = "prefix") -> Packed:
    """Pack rows (c_1..c_{p_r}, q^(r)) over one shared context.

    Args:
        context_ids: (n,) context token ids c_1..c_n.
        queries: R non-empty 1-D query id tensors (lengths may differ).
        prefix_lengths: p_r ∈ 0..n per row (n for "whole context").
        query_positions: ``"prefix"``: row r's query sits at positions p_r..p_r+T_r−1, as in the prompt
            [c_1..c_{p_r}, q]; ``"original"``: at n..n+T_r−1, its position after the whole context.
    """
    n = int(context_ids.shape[-1])
    if context_ids.dim() != 1:
        raise ContextPatchError(f"context_ids must be 1-D (n,), got shape {tuple(context_ids.shape)}")
    if not queries or len(queries) != len(prefix_lengths):
        raise ContextPatchError(f"need one prefix length per query: {len(queries)} queries, "
                                f"{len(prefix_lengths)} prefix lengths")
    if any(q.dim() != 1 or q.shape[-1] == 0 for q in queries):
        raise ContextPatchError("every query must be a non-empty 1-D tensor of token ids")
    if any(not 0 <= p <= n for p in prefix_lengths):
        raise ContextPatchError(f"prefix lengths must lie in 0..{n}, got {prefix_lengths}")
    if query_positions not in ("prefix", "original"):
        raise ContextPatchError(f"query_positions must be 'prefix' or 'original', got {query_positions!r}")
    lengths = [int(q.shape[-1]) for q in queries]
    R, T = len(queries), max(lengths)
    L = n + sum(lengths)
    dev = context_ids.device
    allowed = torch.zeros(L, L, dtype=torch.bool, device=dev)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    pos = [torch.arange(n, device=dev)]
    rows = torch.empty(R, T, dtype=torch.long, device=dev)
    valid = torch.zeros(R, T, dtype=torch.bool, device=dev)
    s = n
    for r, (p, t) in enumerate(zip(prefix_lengths, lengths, strict=True)):
        allowed[s:s + t, :p] = True
        allowed[s:s + t, s:s + t] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        start = p if query_positions == "prefix" else n
        pos.append(torch.arange(start, start + t, device=dev))
        rows[r] = s + torch.arange(T, device=dev).clamp_max(t - 1)
        valid[r, :t] = True
        s += t
    ids = torch.cat([context_ids, *[q.to(dev) for q in queries]])[None]
    return Packed(input_ids=ids, position_ids=torch.cat(pos)[None], allowed=allowed, row_positions=rows,
                  valid=valid)
