"""One context, many rows: shared context passes for many queries and for every prefix of the context.

Both producers replace step 1 of the engine (the capture pass) by ONE packed pass (see
:mod:`contextpatch._packing`): the context is computed once and every row's query tokens attend to
their own context prefix through a 4-D attention mask (the context's KV cache, shared). Step 2 is the
usual :func:`~contextpatch.engine.patched_pass` over a batch of rows.

    extract_many(model, context, queries)     R = Q rows, each the whole context + its own query
    extract_prefixes(model, context, query)   R = n rows, row i = prefix c_1..c_i + the query
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from .._packing import Packed, additive_mask, pack_rows
from ..adapters import FamilyAdapter, get_adapter
from ._context_patches import ContextPatches
from ._extract import build_meta, extract
from ._model import check_inputs, require_hf_model
from ._records import LayerPatch, OutputPatch
from ._step1_capture import Targets, capture_targets
from ._step2_patched import patched_pass

__all__ = ["extract_many", "extract_prefixes", "extract_prefixes_naive", "packed_attention_mask", "packed_targets",
           "check_context"]


def packed_attention_mask(model: nn.Module, packed: Packed) -> Tensor | dict[str, Tensor]:
    """The 4-D additive mask of a packed sequence, with the model's sliding windows applied.

    Mixed full/sliding models (Gemma-2/3, Qwen2/3 with ``layer_types``) get a dict keyed by layer type;
    models whose every layer slides (Mistral/Mixtral with ``sliding_window``) get the windowed mask.
    A key at position p_k is visible from position p_q in a window W iff p_k > p_q − W (HF's rule).
    """
    cfg = model.config
    dtype = next(model.parameters()).dtype
    full = packed.mask(dtype)
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return full
    pos = packed.position_ids[0]
    in_window = pos[None, :] > pos[:, None] - int(window)
    windowed = additive_mask(packed.allowed & in_window, dtype)
    types = getattr(cfg, "layer_types", None)
    if types and "sliding_attention" in types:
        return {"full_attention": full, "sliding_attention": windowed}
    if getattr(cfg, "model_type", "") in ("mistral", "mixtral"):
        return windowed
    return full


def check_context(model: nn.Module, adapter: FamilyAdapter, context_ids: Tensor) -> Tensor:
    """The shared context as a non-empty 1-D id tensor of a causal model (one clear error otherwise)."""
    require_hf_model(model)
    if not adapter.causal:
        raise ContextPatchError(f"shared context passes need a causal model; {adapter.name} is bidirectional "
                                "(every token sees every other): use extract() per query instead")
    ids = torch.as_tensor(context_ids).reshape(-1) if not isinstance(context_ids, Tensor) else context_ids
    if ids.dim() != 1 or ids.numel() == 0:
        raise ContextPatchError(f"context_ids must be a non-empty 1-D tensor of token ids, got {tuple(ids.shape)}")
    check_inputs(model, ids[None])
    return ids


def packed_targets(model: nn.Module, adapter: FamilyAdapter, context_ids: Tensor, queries: Sequence[Tensor],
                   prefix_lengths: list[int], *, query_positions: str = "original", chunk_size: int | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[Targets, Tensor, Tensor]:
    """Step 1 for R rows over one context: the with-context targets of every row's query tokens.

    Row r is the prompt (c_1..c_{p_r}, queries[r]); rows are packed over the shared context, at most
    ``chunk_size`` per pass. Returns the targets (z[ℓ], r[ℓ]: (R, T, ·), T = the longest query), the query
    position ids (R, T) and the validity mask (R, T) (False on the slots that pad a shorter query).
    """
    dev = next(model.parameters()).device
    R, T = len(queries), max(int(q.shape[-1]) for q in queries)
    chunk = chunk_size or R
    if chunk < 1:
        raise ContextPatchError(f"chunk_size must be ≥ 1, got {chunk_size}")
    zs: list[list[Tensor]] = []
    rs: list[list[Tensor]] = []
    pos: list[Tensor] = []
    valid: list[Tensor] = []
    for s in range(0, R, chunk):
        part = [q.to(dev) for q in queries[s:s + chunk]]
        packed = pack_rows(context_ids.to(dev), part, prefix_lengths[s:s + chunk], query_positions=query_positions)
        rows = torch.cat([packed.row_positions, packed.row_positions[:, -1:].expand(-1, T - packed.valid.shape[1])], 1)
        cap = capture_targets(model, packed.input_ids, rows.reshape(1, -1), adapter=adapter,
                              attention_mask=packed_attention_mask(model, packed),
                              position_ids=packed.position_ids, need_output=False)
        r = rows.shape[0]
        zs.append([z.reshape(r, T, -1) for z in cap.targets.z])
        rs.append([x.reshape(r, T, -1) for x in cap.targets.r])
        pos.append(packed.position_ids[0, rows])
        valid.append(torch.nn.functional.pad(packed.valid, (0, T - packed.valid.shape[1])))
        if progress is not None:
            progress(r)
    L = len(zs[0])
    targets = Targets([torch.cat([c[i] for c in zs]) for i in range(L)],
                      [torch.cat([c[i] for c in rs]) for i in range(L)])
    return targets, torch.cat(pos), torch.cat(valid)


def _run_packed(model, adapter, context_ids: Tensor, queries: Sequence[Tensor], prefix_lengths: list[int], *,
                query_positions: str, output_patch: str | OutputPatch, tol: float | None,
                chunk_size: int | None, progress: Callable[[int], None] | None = None) -> ContextPatches:
    dev = next(model.parameters()).device
    targets, position_ids, valid = packed_targets(model, adapter, context_ids, queries, prefix_lengths,
                                                  query_positions=query_positions, chunk_size=chunk_size,
                                                  progress=progress)
    R, T = valid.shape
    # shorter queries are right-padded by repeating their last token (masked out, and causal: never seen)
    query_ids = torch.stack([q.to(dev)[torch.arange(T, device=dev).clamp_max(q.shape[-1] - 1)] for q in queries])
    # causal rows: the right padding is never seen by a real token, so no padding mask (docs/engine.md)
    res = patched_pass(model, query_ids, targets, adapter=adapter, valid=valid, position_ids=position_ids,
                       output_patch=output_patch, tol=tol)
    n = int(context_ids.numel())
    index = position_ids.new_tensor(range(n, n + T)).expand(R, T)
    context_mask = torch.zeros(R, n + T, dtype=torch.bool, device=dev)
    for row, p in enumerate(prefix_lengths):
        context_mask[row, :p] = True
    meta = build_meta(model, adapter, res.slot, kind="token", bos_is_context=True, renumber_positions=False,
                      shared_context={"context_length": n, "prefix_lengths": list(prefix_lengths),
                                      "query_positions": query_positions})
    return ContextPatches(res.layers, query_ids, position_ids, valid, index, context_mask, meta)


def extract_many(model: nn.Module, context_ids: Tensor, queries: Sequence[Tensor] | Tensor, *,
                 output_patch: str | OutputPatch = "auto", tol: float | None = None,
                 chunk_size: int | None = None) -> ContextPatches:
    """Patches for Q queries against ONE context, sharing a single context pass.

    Row q of the result is what ``extract(model, cat(context, queries[q]), context=n)`` gives: its query tokens
    keep their positions n..n+T−1. Causal models only.

    Args:
        context_ids: (n,) the shared context.
        queries: Q 1-D id tensors (lengths may differ: rows are right-padded, ``patches.valid`` marks the real
            tokens), or a (Q, T) tensor.
        chunk_size: pack at most this many queries per context pass (bounds the packed length n + chunk·T).
    Returns:
        :class:`ContextPatches` with batch (Q, T), T the longest query.
    """
    adapter = get_adapter(model)
    ctx = check_context(model, adapter, context_ids)
    qs = list(queries.unbind(0)) if isinstance(queries, Tensor) and queries.dim() == 2 else list(queries)
    if not qs:
        raise ContextPatchError("no queries given")
    n = int(ctx.numel())
    return _run_packed(model, adapter, ctx, qs, [n] * len(qs), query_positions="original",
                       output_patch=output_patch, tol=tol, chunk_size=chunk_size)


def extract_prefixes(model: nn.Module, context_ids: Tensor, query_ids: Tensor, *,
                     prefix_lengths: Sequence[int] | None = None, query_positions: str = "prefix",
                     output_patch: str | OutputPatch = "auto", tol: float | None = None,
                     chunk_size: int | None = None, progress: Callable[[int], None] | None = None) -> ContextPatches:
    """Patches of the query for every context prefix c_1..c_i, i = 1..n, in one packed pass.

    Row i−1 is what ``extract(model, cat(context[:i], query), context=i)`` gives. A causal context token never
    sees later tokens, so the n prefix prompts share the context's keys and values.

    Args:
        context_ids: (n,); query_ids: (T,).
        prefix_lengths: which prefixes (default 1..n).
        query_positions: ``"prefix"`` (default): in row i the query sits at positions i..i+T−1, as in the prompt
            [c_1..c_i, x]; ``"original"``: at n..n+T−1 in every row.
        chunk_size: rows per packed pass (bounds memory: the packed length is n + chunk·T).
        progress: called with the number of rows finished after each packed pass (e.g. a progress bar).
    """
    adapter = get_adapter(model)
    ctx = check_context(model, adapter, context_ids)
    q = torch.as_tensor(query_ids).reshape(-1)
    if q.numel() == 0:
        raise ContextPatchError("the query is empty")
    n = int(ctx.numel())
    lengths = list(range(1, n + 1)) if prefix_lengths is None else [int(p) for p in prefix_lengths]
    if not lengths or any(not 1 <= p <= n for p in lengths):
        raise ContextPatchError(f"prefix lengths must lie in 1..{n} (an empty prefix has no patch), got {lengths[:8]}")
    return _run_packed(model, adapter, ctx, [q] * len(lengths), lengths, query_positions=query_positions,
                       output_patch=output_patch, tol=tol, chunk_size=chunk_size, progress=progress)


def extract_prefixes_naive(model: nn.Module, context_ids: Tensor, query_ids: Tensor, *,
                           prefix_lengths: Sequence[int] | None = None, query_positions: str = "prefix",
                           progress=None, **kwargs) -> ContextPatches:
    """The reference for :func:`extract_prefixes`: one full :func:`extract` per prefix (n forward passes).

    ``progress`` (optional) is called with each finished prefix index, e.g. a progress bar's update.
    """
    ctx = torch.as_tensor(context_ids).reshape(-1)
    q = torch.as_tensor(query_ids).reshape(-1)
    n, T = int(ctx.numel()), int(q.numel())
    lengths = list(range(1, n + 1)) if prefix_lengths is None else [int(p) for p in prefix_lengths]
    rows = []
    for i in lengths:
        start = i if query_positions == "prefix" else n
        pos = torch.cat([torch.arange(i), torch.arange(start, start + T)])
        rows.append(extract(model, torch.cat([ctx[:i], q]), context=i, position_ids=pos[None], **kwargs))
        if progress is not None:
            progress(i)
    first = rows[0]
    layers = [_cat_layers([r.layers[li] for r in rows]) for li in range(first.num_layers)]
    options = dict(first.meta.options)
    options["shared_context"] = {"context_length": n, "prefix_lengths": lengths, "query_positions": query_positions,
                                 "naive": True}
    cat = {k: torch.cat([getattr(r, k) for r in rows]) for k in ("query_ids", "position_ids", "valid", "query_index")}
    meta = dataclasses.replace(first.meta, options=options)
    return ContextPatches(layers, cat["query_ids"], cat["position_ids"], cat["valid"], cat["query_index"],
                          torch.zeros(len(rows), n + T, dtype=torch.bool), meta)


def _cat_layers(parts: list[LayerPatch]) -> LayerPatch:
    """Concatenate per-token layer patches along the row dimension."""
    flat = [p.tensors() for p in parts]
    return LayerPatch.from_tensors({k: torch.cat([f[k] for f in flat]) for k in flat[0]})
