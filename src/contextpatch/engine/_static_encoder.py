"""Static adapters for bidirectional encoders (BERT family): an instruction prefix compressed into the encoder.

A sentence encoder is often run as [CLS] prefix sentence [SEP] (e.g. "Represent this sentence for retrieving
supporting documents:"). In a bidirectional model every token sees the prefix, [CLS] and [SEP] included, so the
targets are the with-prefix states of EVERY kept token (all but the prefix), and the adapter, applied to every
token of [CLS] sentence [SEP] at positions 0.. (as the encoder normally runs), is fitted to reproduce them:

    with prefix   ids = s[:insert_at] + prefix + s[insert_at:]   (one padded batch; token_type_ids all 0)
    targets       z_C[ℓ], r_C[ℓ] at the kept tokens (capture pass with the padding mask)
    fit           the layer-by-layer ridge fit of :func:`~contextpatch.engine.fit_static` on [CLS] s [SEP]

The same :class:`StaticPatches` type results (``meta.options["encoder"]``), so ``applied``, ``save``,
``to_peft`` and ``save_merged`` work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from ..adapters import get_adapter
from ._extract import build_meta
from ._layout import make_layout
from ._model import check_inputs, require_hf_model
from ._records import OutputPatch
from ._static_fit import check_rank, fit_layers
from ._static_patches import StaticPatches
from ._step1_capture import capture_targets
from ._step2_patched import resolve_slot

__all__ = ["fit_static_encoder", "with_prefix_batch"]


def with_prefix_batch(prefix_ids: Tensor, sentences: Sequence[Tensor], insert_at: int = 1,
                      pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The with-prefix batch: ids (K, L), attention mask (K, L), prefix mask (K, L) (True on prefix tokens)."""
    rows = [torch.cat([s[:insert_at], prefix_ids, s[insert_at:]]) for s in sentences]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    pm = torch.zeros(len(rows), L, dtype=torch.bool)
    for k, r in enumerate(rows):
        ids[k, :len(r)], am[k, :len(r)] = r, 1
        pm[k, insert_at:insert_at + len(prefix_ids)] = True
    return ids, am, pm


def fit_static_encoder(model: nn.Module, prefix_ids: Tensor, sentences: Sequence[Tensor], *, insert_at: int = 1,
                       ridge: float = 1e-3, rank: int | None = None, output_patch: str | OutputPatch = "auto",
                       seed: int | None = None) -> StaticPatches:
    """Fit a static adapter that makes the encoder run on ``sentences`` (each a full tokenized [CLS] … [SEP]
    id tensor) as if ``prefix_ids`` were inserted after their first ``insert_at`` tokens.

    Bidirectional models only; for causal LMs use :func:`fit_static`.
    """
    require_hf_model(model)
    adapter = get_adapter(model)
    if adapter.causal:
        raise ContextPatchError(f"{adapter.name} is causal: use fit_static (the context is a prefix there)")
    prefix = torch.as_tensor(prefix_ids).reshape(-1).long()
    rows = [torch.as_tensor(s).reshape(-1).long() for s in sentences]
    if prefix.numel() == 0 or not rows or any(len(s) <= insert_at for s in rows):
        raise ContextPatchError("need a non-empty prefix and sentences longer than insert_at tokens")
    if not ridge >= 0:
        raise ContextPatchError(f"ridge must be ≥ 0, got {ridge}")
    check_rank(model, rank)
    slot = resolve_slot(adapter, model, output_patch)
    dev = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", 0) or 0
    ids, am, pm = (t.to(dev) for t in with_prefix_batch(prefix, rows, insert_at, pad))
    check_inputs(model, ids)
    layout = make_layout(ids, pm, attention_mask=am, renumber_positions=True)
    cap = capture_targets(model, ids, layout.index, adapter=adapter, attention_mask=am,
                          position_ids=layout.full_position_ids, need_output=False)
    mask = layout.valid.long()
    layers = fit_layers(model, cap.targets.z, cap.targets.r, layout.query_ids, layout.position_ids, layout.valid,
                        slot=slot, ridge=float(ridge), rank=rank, attention_mask=mask)
    meta = build_meta(model, adapter, slot, kind="static",
                      variant="static adapter of an encoder prefix: ridge least squares over every kept token",
                      context_ids=[int(t) for t in prefix.tolist()], context_length=int(prefix.numel()),
                      num_calibration_queries=len(rows), num_calibration_tokens=int(layout.valid.sum()),
                      encoder=True, insert_at=insert_at, keep_prefix=0, renumber_positions=True,
                      query_positions="0..T-1", ridge=float(ridge),
                      ridge_convention="lambda = ridge * mean ||key||^2", rank=rank, seed=seed,
                      conv1d=adapter.conv1d)
    return StaticPatches(layers, meta)
