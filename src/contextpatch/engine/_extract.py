"""Public entry points: ``extract`` (capture pass → patched pass → ContextPatches), ``verify``, ``run_patched``.

``verify`` never trusts the engine's own passes for its reference: it runs the model once more, plainly
(no hooks, the full input), and reads the output at the kept positions recomputed from the context mask here.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from ..adapters import FamilyAdapter, get_adapter
from ._context_patches import ContextPatches
from ._identity import config_hash, weight_fingerprint
from ._layout import ContextSpec, make_layout
from ._model import check_inputs, compute_dtype, model_output, output_name, require_hf_model, run_model
from ._records import OutputPatch, PatchMeta
from ._step1_capture import capture_targets
from ._step2_patched import patched_pass

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


def prepare_inputs(model, input_ids, position_ids):
    require_hf_model(model)
    adapter = get_adapter(model)
    if not isinstance(input_ids, Tensor):
        raise ContextPatchError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() == 2:
        check_inputs(model, input_ids, None if position_ids is None else torch.as_tensor(position_ids))
    dev = next(model.parameters()).device
    return adapter, input_ids.to(dev)


def _run(model, input_ids, context, *, query, attention_mask, position_ids, token_type_ids, bos_is_context,
         renumber_positions, output_patch, tol):
    adapter, input_ids = prepare_inputs(model, input_ids, position_ids)
    dev = input_ids.device
    layout = make_layout(input_ids, context, query=query, attention_mask=attention_mask, position_ids=position_ids,
                         bos_is_context=bos_is_context, renumber_positions=renumber_positions)
    full_kw, q_kw = {}, {}
    if token_type_ids is not None:
        full_kw["token_type_ids"] = token_type_ids.to(dev)
        q_kw["token_type_ids"] = layout.gather(full_kw["token_type_ids"])
    cap = capture_targets(model, input_ids, layout.index, adapter=adapter, attention_mask=attention_mask,
                          position_ids=layout.full_position_ids, need_output=False, **full_kw)
    # causal: right padding is never seen by a real token, and a padding mask would leave far padding rows fully
    # masked under a sliding window (NaN in HF's float64 eager attention); encoders need the mask
    mask = layout.attention_mask if not adapter.causal else None
    res = patched_pass(model, layout.query_ids, cap.targets, adapter=adapter, valid=layout.valid,
                       position_ids=layout.position_ids, attention_mask=mask, output_patch=output_patch, tol=tol,
                       **q_kw)
    meta = build_meta(model, adapter, res.slot, kind="token", bos_is_context=bos_is_context,
                      renumber_positions=renumber_positions)
    patches = ContextPatches(res.layers, layout.query_ids, layout.position_ids, layout.valid, layout.index,
                             layout.context_mask, meta)
    return patches, q_kw


def build_meta(model: nn.Module, adapter: FamilyAdapter, slot: str, *, kind: str, variant: str | None = None,
               **options) -> PatchMeta:
    """The metadata stored with every patch set (model identity, variant, options, ‖W‖ per layer)."""
    dtype = next(model.parameters()).dtype
    return PatchMeta(
        kind=kind, family=adapter.name, slot=slot, num_layers=len(adapter.resolve(model)),
        input_modules=list(adapter.inputs), output_module=adapter.output or adapter.experts,
        scale_module=adapter.slot.split(":", 1)[1] if adapter.slot_kind == "scale" else None,
        model_name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_class=type(model).__name__, config_hash=config_hash(model), weight_fingerprint=weight_fingerprint(model),
        dtype=str(dtype), compute_dtype=str(compute_dtype(dtype)), variant=variant or adapter.variant,
        weight_norms=_weight_norms(model, adapter), options={"causal": adapter.causal, **options})


def extract(model: nn.Module, input_ids: Tensor, context: ContextSpec = None, *, query: ContextSpec = None,
            attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
            token_type_ids: Tensor | None = None, bos_is_context: bool = True, renumber_positions: bool = False,
            output_patch: str | OutputPatch = "auto", tol: float | None = None) -> ContextPatches:
    """Turn the context of ``input_ids`` into per-layer, per-token patches on the MLPs.

    Args:
        model: a HF model of a supported family (``eval()``; any device or accelerate device map).
        input_ids: (B, T) or (T,) token ids of context and query together.
        context: which tokens are context: a count n (the first n), a ``(start, end)`` span, a slice, or a
            (T,) / (B, T) boolean mask. Default: every token except the query.
        query: alternatively the kept tokens (same forms); default the last token.
        bos_is_context: False keeps the first token (BOS) in the context-free pass.
        renumber_positions: False (default) keeps the kept tokens' original position ids; True renumbers 0..T_q−1.
        output_patch: an :class:`OutputPatch`: "auto" (bias if the MLP output matrix has one, else rank-1 on it;
            Gemma-2/3 "stable"; Mixtral "moe"), "bias", "weight", or for Gemma-2/3 "scale" (the plain post-norm
            gain patch, ill-conditioned when some |u_j| is small: docs/theory.md §3.2).
        tol: smallest accepted ‖z‖ (and |u_j|); default :func:`contextpatch.theory.default_tol`.

    Returns:
        :class:`ContextPatches` with factors (B, T_q, ·) per layer; ``patches.run(model)`` reproduces the
        with-context output at the kept tokens.
    """
    return _run(model, input_ids, context, query=query, attention_mask=attention_mask, position_ids=position_ids,
                token_type_ids=token_type_ids, bos_is_context=bos_is_context,
                renumber_positions=renumber_positions, output_patch=output_patch, tol=tol)[0]


@dataclass
class Verification:
    """Max |Δ| over the kept tokens between a plain with-context forward pass of the model and the patched
    context-free output (control: the unpatched context-free output); logits for LMs, final hidden states for
    bare models and encoders (``output``)."""

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


def reference_output(model: nn.Module, input_ids: Tensor, context_mask: Tensor, *,
                     attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                     token_type_ids: Tensor | None = None) -> tuple[list[Tensor], str]:
    """A plain forward pass of the model on the full input (no hooks), read at the kept tokens of each row.

    The kept positions are recomputed here, row by row, as the non-padding tokens outside ``context_mask``,
    independently of the engine's layout. Position ids: the given ones, else the cumulative count of real tokens
    (left padding), else 0..T−1. Returns one (n_b, V) tensor per row and the output's name.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    am = torch.ones(B, T, dtype=torch.long, device=dev) if attention_mask is None else attention_mask.to(dev).long()
    if position_ids is None:
        position_ids = (am.cumsum(1) - 1).clamp_min(0) if attention_mask is not None else \
            torch.arange(T, device=dev).expand(B, T)
    kw = {"token_type_ids": token_type_ids.to(dev)} if token_type_ids is not None else {}
    if get_adapter(model).causal:
        kw["use_cache"] = False
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=am, position_ids=position_ids.to(dev).expand(B, T), **kw)
    full = model_output(out)
    keep = am.bool() & ~context_mask.to(dev)
    return [full[b, torch.nonzero(keep[b]).flatten()] for b in range(B)], output_name(out)


def _max_abs(rows: list[Tensor], other: Tensor, what: str) -> float:
    worst = 0.0
    for b, ref in enumerate(rows):
        got = other[b, :ref.shape[0]].to(device=ref.device, dtype=torch.float64)
        d = (got - ref.to(torch.float64)).abs()
        if not bool(torch.isfinite(ref).all()):
            raise ContextPatchError(f"the plain with-context forward pass gives NaN/inf in row {b}: the model itself "
                                    "overflows on this input (check its weights, e.g. the LM head and final norm)")
        if not bool(torch.isfinite(got).all()):
            raise ContextPatchError(f"the {what} context-free output contains NaN/inf in row {b}")
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


def verify(model: nn.Module, input_ids: Tensor, context: ContextSpec = None, **kwargs) -> Verification:
    """Extract the patches (same arguments as :func:`extract`), run them, and compare with a plain forward pass.

    ``max_abs_diff`` = max over kept tokens of |patched context-free output − plain with-context output|;
    ``control_max_abs_diff`` is the same for the unpatched context-free output (large: the context matters).
    """
    opts = dict(query=None, attention_mask=None, position_ids=None, token_type_ids=None, bos_is_context=True,
                renumber_positions=False, output_patch="auto", tol=None)
    unknown = sorted(set(kwargs) - set(opts))
    if unknown:
        raise ContextPatchError(f"verify() got unknown option(s) {unknown}; it takes extract()'s options")
    opts.update(kwargs)
    patches, q_kw = _run(model, input_ids, context, **opts)
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    ids = ids.to(next(model.parameters()).device)
    ref, name = reference_output(model, ids, patches.context_mask, attention_mask=opts["attention_mask"],
                                 position_ids=opts["position_ids"], token_type_ids=opts["token_type_ids"])
    patched = patches.run(model, **q_kw)
    adapter = get_adapter(model)
    dev = next(model.parameters()).device
    with torch.no_grad():
        control = model_output(run_model(model, adapter, patches.query_ids.to(dev),
                                         position_ids=patches.position_ids.to(dev),
                                         attention_mask=patches.attention_mask, **q_kw))
    return Verification(
        max_abs_diff=_max_abs(ref, patched, "patched"), control_max_abs_diff=_max_abs(ref, control, "unpatched"),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), arch=type(model).__name__,
        family=adapter.name, slot=patches.meta.slot, output=name, num_layers=patches.num_layers,
        num_query_tokens=int(sum(r.shape[0] for r in ref)))


def run_patched(model: nn.Module, patches: ContextPatches, **model_kwargs) -> Tensor:
    """Run the context-free kept tokens of ``patches`` with the patches applied; returns the output at every kept
    token: (B, T_q, vocab) logits or (B, T_q, d) final hidden states, in the model's dtype."""
    return patches.run(model, **model_kwargs)
