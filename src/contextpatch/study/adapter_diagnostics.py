"""Why a static adapter loses: where along the layers, in which tokens, and through how much attention to the
context the adapted model departs from the with-context one (docs/adapters.md, "Why the closed form loses").

    residual_mismatch   per block ℓ: Σ‖r − r_C‖² / Σ‖r⁰ − r_C‖² right after attention and at the block output
                        (r: adapter applied, r⁰: no context and no adapter, r_C: with context; 0 = reproduced,
                        1 = no better than dropping the context)
    context_attention   per layer: the share of the query tokens' attention that lands on the context tokens
    kl_by_position      KL(with context ‖ method) at each query-token index
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from .adapters import DROP_IN, FixedContext, Query, QueryBatch, run_queries

__all__ = ["residual_mismatch", "context_attention", "kl_by_position", "attention_features", "linear_explained",
           "head_correction", "diagnostics"]


@torch.no_grad()
def _forward(model: nn.Module, adapted, batch: QueryBatch):
    """The forward pass of ``batch`` through ``model`` with ``adapted``: a ``StaticPatches`` applied to ``model``,
    another model (merged adapter, peft student) run instead, or None (``model`` itself)."""
    if adapted is not None and hasattr(adapted, "applied"):
        with adapted.applied(model):
            return model(input_ids=batch.ids, position_ids=batch.pos)
    return (model if adapted is None else adapted)(input_ids=batch.ids, position_ids=batch.pos)


def _with_hooks(handles: list, run) -> None:
    """``run()``, then remove ``handles`` whatever happens."""
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def residual_mismatch(model: nn.Module, context: FixedContext, queries: Sequence[Query], adapted=None, *,
                      keep_prefix: int = 1, renumber_positions: bool = True) -> list[dict[str, float]]:
    """Where along the layers the adapted residual stream departs from the with-context one.

    Per block ℓ, over the query tokens: ``after_attention`` = Σ‖r − r_C‖² / Σ‖r⁰ − r_C‖² at the residual just
    before the MLP output is added (r: with ``static`` applied, r⁰: no context, no adapter, r_C: with context),
    and ``block_out`` the same ratio at the block output (the next block's input; the last block: the final
    hidden state before the norm). 0: the adapter reproduces the context's effect there, 1: no better than
    dropping the context.

    ``adapted``: a ``StaticPatches`` (applied to ``model``), another model of the same architecture (e.g. a merged
    adapter, or a LoRA student: a peft model is unwrapped with ``get_base_model()``), or None (the control)."""
    from ..adapters import get_adapter
    from ..engine import packed_targets
    from ..engine._model import tap_residual

    adapter = get_adapter(model)
    batch = run_queries(model, context, queries, keep_prefix=keep_prefix, renumber_positions=renumber_positions)
    rows = list(batch.queries.unbind(0))
    n = int(context.context_ids.numel())
    tg, _, _ = packed_targets(model, adapter, context.context_ids, rows, [n] * len(rows))
    blocks = adapter.resolve(model)
    # block outputs with context: the next block's r_C minus its attention is not available, so read the block
    # outputs in a plain with-context pass of each query (small models: one pass per query is cheap)
    outs_c = _block_outputs_with_context(model, context, rows, batch)

    def read(apply):
        got: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        H = []
        net = model if apply is None or hasattr(apply, "applied") else apply
        net = net.get_base_model() if hasattr(net, "get_base_model") else net
        for b in adapter.resolve(net):
            H += tap_residual(b, lambda r, i=b.index: got.__setitem__(i, r[:, batch.p:].double()), lambda x: x)
            H.append(b.block.register_forward_hook(
                lambda mod, a, o, i=b.index: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[:, batch.p:]
                                                               .double())))
        _with_hooks(H, lambda: _forward(model, apply, batch))
        return got, outs

    r0, o0 = read(None)
    r1, o1 = read(adapted) if adapted is not None else (r0, o0)
    v = batch.valid
    res = []
    for b in blocks:
        i, rc = b.index, tg.r[b.index].double()

        def ratio(x, x0, ref):
            return float((x - ref)[v].pow(2).sum() / (x0 - ref)[v].pow(2).sum().clamp_min(1e-30))
        res.append({"layer": i, "after_attention": ratio(r1[i], r0[i], rc),
                    "block_out": ratio(o1[i], o0[i], outs_c[i])})
    return res


def _block_outputs_with_context(model, context: FixedContext, rows: list[Tensor], batch: QueryBatch) -> dict:
    from ..adapters import get_adapter

    blocks = get_adapter(model).resolve(model)
    n, T = int(context.context_ids.numel()), batch.valid.shape[1]
    outs: dict[int, list[Tensor]] = {b.index: [] for b in blocks}
    H = [b.block.register_forward_hook(
        lambda mod, a, o, i=b.index: outs[i].append((o[0] if isinstance(o, tuple) else o)[0, n:n + T].double()))
        for b in blocks]

    @torch.no_grad()
    def run():
        for q in rows:
            ids = torch.cat([context.context_ids.to(q.device), q])[None]
            model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=q.device)[None])
    _with_hooks(H, run)
    return {i: torch.stack(o) for i, o in outs.items()}


def context_attention(model: nn.Module, context: FixedContext, queries: Sequence[Query]) -> list[float]:
    """Per layer: the mean share of the query tokens' attention (over heads and tokens) that lands on the context
    tokens after ``<bos>`` in a with-context pass (eager attention: ``output_attentions``)."""
    n = int(context.context_ids.numel())
    per_layer: list[list[float]] = []
    with torch.no_grad():
        for q in queries:
            ids = torch.cat([context.context_ids, q.ids])[None]
            att = model(input_ids=ids, output_attentions=True).attentions
            if att is None or any(a is None for a in att):
                raise ContextPatchError("context_attention needs eager attention (attn_implementation='eager')")
            for i, a in enumerate(att):
                if len(per_layer) <= i:
                    per_layer.append([])
                per_layer[i].append(float(a[0, :, n:, 1:n].sum(-1).mean()))
    return [float(np.mean(x)) for x in per_layer]


def kl_by_position(logits: Tensor, teacher: Tensor, valid: Tensor) -> list[float]:
    """Mean KL(teacher ‖ logits) at each query-token index t (over the queries that have a token t)."""
    lp, lq = teacher.detach().double().log_softmax(-1), logits.detach().double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return [float(kl[:, t][valid[:, t]].mean()) for t in range(kl.shape[1]) if bool(valid[:, t].any())]


def _ridge_fit(X: Tensor, Y: Tensor, ridge: float) -> Tensor:
    lam = ridge * float(X.pow(2).sum(-1).mean())
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)


def attention_features(model: nn.Module, context: FixedContext, queries: Sequence[Query], layer: int, *,
                       keep_prefix: int = 1, renumber_positions: bool = True) -> dict[str, Tensor]:
    """Context-free pass (no adapter): at block ``layer``, for every query token, ``delta`` = r_C − r (the
    residual mismatch right after attention), ``a`` = the input of the attention output projection, and
    ``x_tilde`` = Σ_s α_h,ts x_s per head h, concatenated (x = the value projection's input, α = the attention
    weights): the features a value-projection patch ΔW_v would act on (a_h + ΔW_v,h x̃_h). Llama-like models."""
    from ..adapters import get_adapter
    from ..engine import packed_targets
    from ..engine._model import tap_residual

    adapter = get_adapter(model)
    batch = run_queries(model, context, queries, keep_prefix=keep_prefix, renumber_positions=renumber_positions)
    n = int(context.context_ids.numel())
    tg, _, _ = packed_targets(model, adapter, context.context_ids, list(batch.queries.unbind(0)), [n] * len(queries))
    b = adapter.resolve(model)[layer]
    attn = getattr(b.block, "self_attn", None)
    if attn is None or not hasattr(attn, "v_proj"):
        raise ContextPatchError("attention_features reads self_attn.v_proj / o_proj (Llama-like models)")
    box: dict[str, Tensor] = {}
    H = [attn.v_proj.register_forward_hook(lambda m, a, o: box.__setitem__("x", a[0])),
         attn.o_proj.register_forward_hook(lambda m, a, o: box.__setitem__("a", a[0])),
         attn.register_forward_hook(lambda m, a, o: box.__setitem__("w", o[1]))]
    H += tap_residual(b, lambda r: box.__setitem__("r", r), lambda x: x)
    _with_hooks(H, lambda: _forward(model, None, batch))
    if box.get("w") is None:
        raise ContextPatchError("attention_features needs eager attention (the weights)")
    p, v = batch.p, batch.valid
    xt = torch.einsum("khts,ksd->kthd", box["w"].double(), box["x"].double()).flatten(2)
    return {"delta": (tg.r[layer].double() - box["r"].double()[:, p:])[v], "a": box["a"].double()[:, p:][v],
            "x_tilde": xt[:, p:][v]}


def linear_explained(model: nn.Module, context: FixedContext, *, layer: int = 0, ridge: float = 0.1) -> dict:
    """How much of block ``layer``'s residual mismatch after attention a linear map of each feature set can carry:
    ridge fits on the calibration queries, residual share Σ‖F W − δ‖² / Σ‖δ‖² on calibration and held-out
    queries (1: nothing carried). Feature sets: ``a`` (what the attention-output slot sees), ``x_tilde``
    (a value-projection patch), both."""
    cal = attention_features(model, context, context.calibration, layer)
    held = attention_features(model, context, context.held_out, layer)
    out = {}
    for name, cols in (("a", ("a",)), ("x_tilde", ("x_tilde",)), ("a+x_tilde", ("a", "x_tilde"))):
        Fc, Fh = torch.cat([cal[c] for c in cols], 1), torch.cat([held[c] for c in cols], 1)
        W = _ridge_fit(Fc, cal["delta"], ridge)
        out[name] = {split: float((F @ W - d).pow(2).sum() / d.pow(2).sum())
                     for split, F, d in (("calibration", Fc, cal["delta"]), ("held_out", Fh, held["delta"]))}
    return out


def head_correction(model: nn.Module, context: FixedContext, static, *, ridge: float = 0.1) -> dict:
    """A last closed-form round in logit space: with ``static`` applied, fit ΔW_U on the LM head's input h so that
    ΔW_U h matches the centred logit gap (with context − adapter) on the calibration queries (ridge least
    squares); held-out KL / accuracy without and with it (drop-in convention)."""
    from .adapters import answer_accuracy, score, with_context

    def run(queries):
        batch = run_queries(model, context, queries, **DROP_IN)
        teacher = with_context(model, context, batch)
        box: dict[str, Tensor] = {}
        h = model.lm_head.register_forward_hook(lambda m, a, o: box.__setitem__("h", a[0]))
        out: dict = {}
        _with_hooks([h], lambda: out.setdefault("logits", _forward(model, static, batch).logits))
        logits = out["logits"][:, batch.p:].double()
        return batch, teacher.double(), logits, box["h"][:, batch.p:].double()

    bc, tc, lc, hc = run(context.calibration)
    gap = (tc - lc)[bc.valid]
    W = _ridge_fit(hc[bc.valid], gap - gap.mean(-1, keepdim=True), ridge)
    bh, th, lh, hh = run(context.held_out)
    before, after = score(lh, th, bh.valid, context.held_out), score(lh + hh @ W, th, bh.valid, context.held_out)
    return {"before": before, "after": after, "ridge": ridge,
            "calibration_accuracy_after": answer_accuracy(lc + hc @ W, context.calibration)}


def diagnostics(model, context: FixedContext, batch: QueryBatch, teacher: Tensor, adapted: dict) -> dict:
    """Every diagnostic of one context for ``compare_methods(..., diagnose=diagnostics)``: the context's attention
    share, the residual mismatch per layer and the KL per query-token index of each adapted model in ``adapted``
    (a StaticPatches or a peft model; None skipped), the logit-space head correction of ``adapted["static_attn"]``
    and the linear-explained shares of layers 0 and 1 (None where the family has no separate value projection)."""

    res: dict = {"context_attention": context_attention(model, context, context.held_out), "mismatch": {},
                 "kl_by_position": {}, "head_correction": head_correction(model, context, adapted["static_attn"])}
    try:
        res["linear_explained"] = {str(layer): linear_explained(model, context, layer=layer) for layer in (0, 1)}
    except ContextPatchError:           # GPT-2's fused c_attn has no separate value projection to read
        res["linear_explained"] = None
    for name, a in adapted.items():
        if a is None:
            continue
        res["mismatch"][name] = residual_mismatch(model, context, context.held_out, a, **DROP_IN)
        logits = _forward(model, a, batch).logits[:, batch.p:]
        res["kl_by_position"][name] = kl_by_position(logits, teacher, batch.valid)
    return res
