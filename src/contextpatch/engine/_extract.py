"""Public entry points: ``extract`` (capture pass → patched pass → ContextPatches), ``verify``, ``run_patched``."""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..adapters import FamilyAdapter, get_adapter
from ._capture import capture_targets
from ._common import check_model, compute_dtype
from ._container import ContextPatches, config_hash, weight_fingerprint
from ._layout import ContextSpec, QueryLayout, make_layout
from ._patched import applied_session, patched_pass, run_model

__all__ = ["extract", "verify", "run_patched", "Verification", "build_meta"]


_NORM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weight_norms(model: nn.Module, adapter: FamilyAdapter) -> list[dict[str, float | None]]:
    """‖W_in‖, ‖W_out‖ (and the norm scale) per layer, cached per model until a weight changes in place.

    The norms read every MLP weight once (in float64); the cache keeps that cost out of repeated extractions.
    """
    def fro(*ws) -> float:
        return float(sum(w.detach().double().pow(2).sum() for w in ws) ** 0.5)

    blocks = adapter.resolve(model)
    mats = []
    for b in blocks:
        ins = [m.weight for m in b.inputs.values()]
        if b.router is not None:
            ins += [b.router.weight, b.experts.gate_up_proj]
        o = b.experts.down_proj if b.experts is not None else b.output.weight
        sc = [b.scale_norm.weight] if b.scale_norm is not None else []
        mats.append((ins, o, sc))
    key = tuple((id(w), w._version) for ins, o, sc in mats for w in (*ins, o, *sc))
    hit = _NORM_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return [dict(d) for d in hit[1]]
    out = [{"in": fro(*ins), "out": fro(o), "scale": fro(adapter.scale_offset + sc[0].double()) if sc else None}
           for ins, o, sc in mats]
    _NORM_CACHE[model] = (key, out)
    return [dict(d) for d in out]


def _run(model, input_ids, context, *, query, attention_mask, position_ids, token_type_ids, bos_is_context,
         renumber_positions, output_patch, stable, tol, need_output):
    check_model(model)
    adapter = get_adapter(model)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
    layout = make_layout(input_ids, context, query=query, attention_mask=attention_mask, position_ids=position_ids,
                         bos_is_context=bos_is_context, renumber_positions=renumber_positions)
    full_kw, q_kw = {}, {}
    if token_type_ids is not None:
        full_kw["token_type_ids"] = token_type_ids.to(dev)
        q_kw["token_type_ids"] = layout.gather(full_kw["token_type_ids"])
    cap = capture_targets(model, input_ids, layout.index, adapter=adapter, attention_mask=attention_mask,
                          position_ids=layout.full_position_ids, need_output=need_output, **full_kw)
    res = patched_pass(model, layout.query_ids, cap.targets, adapter=adapter, valid=layout.valid,
                       position_ids=layout.position_ids, attention_mask=layout.attention_mask,
                       output_patch=output_patch, stable=stable, tol=tol, **q_kw)
    meta = build_meta(model, adapter, res.slot, bos_is_context=bos_is_context,
                      renumber_positions=renumber_positions, stable=stable)
    patches = ContextPatches(res.layers, layout.query_ids, layout.position_ids, layout.valid, layout.index,
                             layout.context_mask, meta)
    return patches, cap.output, res.output, layout, adapter, q_kw


def build_meta(model: nn.Module, adapter: FamilyAdapter, slot: str, *, bos_is_context: bool,
               renumber_positions: bool, stable: bool) -> dict:
    """The metadata stored with every :class:`ContextPatches` (model identity, variant, options, ‖W‖)."""
    return {
        "family": adapter.name, "variant": adapter.variant, "slot": slot,
        "model_name": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__, "config_hash": config_hash(model),
        "weight_fingerprint": weight_fingerprint(model), "dtype": str(next(model.parameters()).dtype),
        "compute_dtype": str(compute_dtype(next(model.parameters()).dtype)),
        "bos_is_context": bos_is_context, "renumber_positions": renumber_positions, "stable": stable,
        "output_module": adapter.output or adapter.experts,
        "scale_module": adapter.slot.split(":", 1)[1] if adapter.slot_kind == "scale" else None,
        "weight_norms": _weight_norms(model, adapter),
    }


def extract(model: nn.Module, input_ids: Tensor, context: ContextSpec = None, *, query: ContextSpec = None,
            attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
            token_type_ids: Tensor | None = None, bos_is_context: bool = True, renumber_positions: bool = False,
            output_patch: str = "auto", stable: bool = False, tol: float | None = None) -> ContextPatches:
    """Turn the context of ``input_ids`` into per-layer, per-token patches on the MLPs.

    Args:
        model: a HF model of a supported family (``eval()``; any device or accelerate device map).
        input_ids: (B, T) or (T,) token ids of context and query together.
        context: which tokens are context: a count n (the first n), a ``(start, end)`` span, a slice, or a
            (T,) / (B, T) boolean mask. Default: every token except the query.
        query: alternatively the kept tokens (same forms); default the last token.
        bos_is_context: False keeps the first token (BOS) in the context-free pass.
        renumber_positions: False (default) keeps the kept tokens' original position ids; True renumbers 0..T_q−1.
        output_patch: "auto" (bias if the MLP output matrix has one, else rank-1 on it; scale for Gemma-2/3),
            "bias" or "weight".
        stable: Gemma-2/3 only, the numerically stable variant (extensions.md §1.3).
        tol: smallest accepted ‖z‖ (and |u_j|); default :func:`contextpatch.theory.default_tol`.

    Returns:
        :class:`ContextPatches` with factors (B, T_q, ·) per layer; ``patches.run(model)`` reproduces the
        with-context output at the kept tokens.
    """
    return _run(model, input_ids, context, query=query, attention_mask=attention_mask, position_ids=position_ids,
                token_type_ids=token_type_ids, bos_is_context=bos_is_context,
                renumber_positions=renumber_positions, output_patch=output_patch, stable=stable, tol=tol,
                need_output=False)[0]


@dataclass
class Verification:
    """Max |Δ| over the kept tokens between the with-context output and the patched (control: unpatched)
    context-free output (logits for LMs, final hidden states for encoders)."""

    max_abs_diff: float
    control_max_abs_diff: float
    dtype: str
    arch: str
    family: str
    slot: str
    output: str
    num_layers: int
    num_query_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _masked_max(a: Tensor, b: Tensor, valid: Tensor) -> float:
    d = (a.to(torch.float64) - b.to(device=a.device, dtype=torch.float64)).abs().amax(-1)
    return float(torch.where(valid.to(d.device), d, torch.zeros_like(d)).max())


def verify(model: nn.Module, input_ids: Tensor, context: ContextSpec = None, **kwargs) -> Verification:
    """Extract the patches and measure patched vs with-context, and the unpatched control (same arguments as
    :func:`extract`)."""
    opts = dict(query=None, attention_mask=None, position_ids=None, token_type_ids=None, bos_is_context=True,
                renumber_positions=False, output_patch="auto", stable=False, tol=None)
    opts.update(kwargs)
    patches, ref, _, layout, adapter, q_kw = _run(model, input_ids, context, need_output=True, **opts)
    patched = run_patched(model, patches, **q_kw)
    control = _plain(model, adapter, layout, **q_kw)
    return Verification(
        max_abs_diff=_masked_max(patched, ref, layout.valid), control_max_abs_diff=_masked_max(control, ref,
                                                                                               layout.valid),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), arch=type(model).__name__,
        family=adapter.name, slot=patches.meta["slot"],
        output="last_hidden_state" if ref.shape[-1] == model.config.hidden_size and not adapter.causal else "logits",
        num_layers=patches.num_layers,
        num_query_tokens=int(layout.valid.sum()))


def _plain(model, adapter, layout: QueryLayout, **q_kw) -> Tensor:
    out = run_model(model, adapter, layout.query_ids, position_ids=layout.position_ids,
                    attention_mask=layout.attention_mask, **q_kw)
    from ._common import model_output
    return model_output(out)


def run_patched(model: nn.Module, patches: ContextPatches, **model_kwargs) -> Tensor:
    """Run the context-free kept tokens of ``patches`` with the patches applied; returns the output at every kept
    token: (B, T_q, vocab) logits or (B, T_q, d) final hidden states, in the model's dtype."""
    from ._common import model_output

    patches.check_model(model)
    adapter = get_adapter(model)
    dev = next(model.parameters()).device
    with applied_session(model, adapter, patches.meta["slot"], patches.layers):
        out = run_model(model, adapter, patches.query_ids.to(dev), position_ids=patches.position_ids.to(dev),
                        attention_mask=None if patches.attention_mask is None else patches.attention_mask.to(dev),
                        **model_kwargs)
    return model_output(out)
