"""Static context adapters: ONE query-independent patch per layer for a fixed context (beyond the papers).

The exact patches of :func:`~contextpatch.engine.extract` depend on the token and its history. A static adapter
trades exactness for reuse: fitted once on K calibration queries (continuations of the context, positions
n..n+T−1), it is applied to every token of any later input, like a LoRA adapter (docs/static.md).

    targets   one packed with-context pass (engine.packed_targets): z_C[ℓ], r_C[ℓ] per calibration token
    layer ℓ   context-free pass over the calibration batch with the static patches of layers < ℓ applied:
              z (MLP input), r (residual), then the input patches of ℓ are fitted and applied, and the
              output-slot input (g, or u for Gemma's post-FF norm) is read; the pass stops after block ℓ.
    input     ΔW_m = argmin Σ ‖ΔW_m z − W_m (z_C − z)‖² + λ‖ΔW_m‖²          (theory.static_patch)
    output    δ = r_C − r:  bias Δb = mean δ;  weight ΔW_out = ridge LS on (g, δ);
              scale Δs_j = Σ δ_j u_j / (Σ u_j² + λ_j)
    ridge     λ = ridge · mean ‖key‖² over the calibration tokens (scale-free; one key: shrinkage 1/(1+ridge));
              scale slot: λ_j = ridge · mean u_j² per coordinate.

Cost: one packed with-context pass over n + K·T tokens, then L context-free passes over the (K, T) batch, pass ℓ
stopping after block ℓ (≈ L/2 full passes in all), plus one K×K (or d×d) solve per matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from .._packing import pack_rows
from .._patches import LowRankPatch
from ..adapters import get_adapter
from ..theory import static_patch
from ._attention_slot import attention_modules, attention_path
from ._extract import build_meta
from ._model import (
    compute_dtype,
    first_arg,
    linear_weight,
    logits_to_keep_kw,
    model_output,
    norm_eps,
    require_hf_model,
    rms_unit,
    run_model,
    tap_residual,
)
from ._records import LayerPatch, OutputPatch, side_path
from ._shared_context import check_context, packed_attention_mask, packed_targets
from ._static_patches import StaticPatches, static_hooks
from ._step1_capture import capture_targets
from ._step2_patched import resolve_slot

__all__ = ["fit_static", "evaluate_static", "fit_layers", "check_rank", "QueryBatch", "query_batch", "teacher_logits"]


class _Stop(Exception):
    """Raised by a hook to end a fitting pass once block ℓ has been read."""


def _queries(queries, model: nn.Module, what: str) -> tuple[Tensor, Tensor]:
    """(K, T) ids right-padded and (K, T) bool validity. Causal: right padding never affects the real tokens (it
    repeats an ordinary token id, not the pad id, so HF does not warn about a missing attention mask)."""
    if isinstance(queries, Tensor):
        rows = list(queries.unbind(0)) if queries.dim() == 2 else [queries]
    else:
        rows = [torch.as_tensor(q) for q in queries]
    if not rows:
        raise ContextPatchError(f"no {what} queries given (need at least one 1-D tensor of token ids)")
    if any(q.dim() != 1 or q.numel() == 0 for q in rows):
        raise ContextPatchError(f"every {what} query must be a non-empty 1-D tensor of token ids")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and any(int(q.min()) < 0 or int(q.max()) >= vocab for q in rows):
        raise ContextPatchError(f"{what} query token ids must lie in [0, {vocab})")
    T = max(q.numel() for q in rows)
    ids = torch.full((len(rows), T), int(rows[0][0]), dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for k, q in enumerate(rows):
        ids[k, :q.numel()], valid[k, :q.numel()] = q.long(), True
    return ids, valid


def _packed(model, ctx: Tensor, ids: Tensor, *, need_output: bool):
    """ONE with-context pass for all rows: targets (K, T, ·) per layer and, if asked, logits (K, T, V)."""
    K, T = ids.shape
    n = int(ctx.numel())
    rows = list(ids.to(next(model.parameters()).device).unbind(0))
    targets, _, _ = packed_targets(model, get_adapter(model), ctx, rows, [n] * K)
    return targets.z, targets.r, (_with_context_logits(model, ctx, rows) if need_output else None)


def _with_context_logits(model, ctx: Tensor, rows: list[Tensor]) -> Tensor:
    """Logits (K, T, V) of every row's tokens after the whole context, from one packed pass."""
    K, T = len(rows), int(rows[0].numel())
    packed = pack_rows(ctx.to(rows[0].device), rows, [int(ctx.numel())] * K, query_positions="original")
    kw = logits_to_keep_kw(model, True, packed.row_positions.reshape(-1))
    with torch.no_grad():
        out = model(input_ids=packed.input_ids, attention_mask=packed_attention_mask(model, packed),
                    position_ids=packed.position_ids, use_cache=False, **kw)
    if getattr(out, "logits", None) is None:
        raise ContextPatchError("evaluate_static compares next-token distributions: the model needs an LM head")
    logits = out.logits if kw else out.logits[:, packed.row_positions.reshape(-1)]
    return logits.reshape(K, T, -1)


def _context_free_batch(model, ctx: Tensor, ids: Tensor, valid: Tensor, keep_prefix: int, renumber: bool):
    """The context-free input of every row: the kept context prefix (e.g. BOS) then the query, with positions
    0..p+T−1 (``renumber``) or 0..p−1 then n..n+T−1 (the query's positions after the whole context).

    Returns ids (K, p+T), position ids (K, p+T), validity (K, p+T) on the model's device."""
    dev = next(model.parameters()).device
    K, T = ids.shape
    n, p = int(ctx.numel()), keep_prefix
    pre = ctx[:p].to(dev).expand(K, p)
    full = torch.cat([pre, ids.to(dev)], 1)
    pos = torch.arange(p + T, device=dev) if renumber else torch.cat([torch.arange(p, device=dev),
                                                                       torch.arange(n, n + T, device=dev)])
    v = torch.cat([torch.ones(K, p, dtype=torch.bool), valid], 1).to(dev)
    return full, pos.expand(K, p + T), v


def _prefix_targets(model, ctx: Tensor, K: int, keep_prefix: int) -> tuple[list[Tensor], list[Tensor]]:
    """With-context targets of the kept prefix tokens (a causal prefix of the context sees only itself)."""
    if keep_prefix == 0:
        return [], []
    dev = next(model.parameters()).device
    pre = ctx[:keep_prefix].to(dev)[None]
    cap = capture_targets(model, pre, torch.arange(keep_prefix, device=dev)[None], need_output=False,
                          position_ids=torch.arange(keep_prefix, device=dev)[None])
    expand = [t.expand(K, *t.shape[1:]) for t in cap.targets.z], [t.expand(K, *t.shape[1:]) for t in cap.targets.r]
    return expand


@dataclass
class QueryBatch:
    """Queries as the context-free model sees them: ``ids``/``pos`` (K, p+T) = [kept prefix, query] with their
    positions; ``valid`` (K, T) marks the real query tokens; ``queries`` (K, T) the right-padded query ids."""

    ids: Tensor
    pos: Tensor
    valid: Tensor
    queries: Tensor
    p: int


def query_batch(model: nn.Module, ctx: Tensor, queries, keep_prefix: int = 0, renumber_positions: bool = False,
                what: str = "evaluation") -> QueryBatch:
    """Validate and pad ``queries`` and lay them out after the kept prefix (see :func:`fit_static`)."""
    _check_prefix(ctx, keep_prefix)
    q, valid = _queries(queries, model, what)
    ids, pos, _ = _context_free_batch(model, ctx, q, valid, keep_prefix, renumber_positions)
    dev = next(model.parameters()).device
    return QueryBatch(ids, pos, valid.to(dev), q.to(dev), keep_prefix)


def teacher_logits(model: nn.Module, ctx: Tensor, batch: QueryBatch) -> Tensor:
    """(K, T, V) logits of every query token after the whole context (one packed with-context pass)."""
    return _with_context_logits(model, ctx, list(batch.queries.unbind(0)))


def _check_prefix(ctx: Tensor, keep_prefix: int) -> None:
    if not 0 <= keep_prefix < int(ctx.numel()):
        raise ContextPatchError(f"keep_prefix={keep_prefix} must lie in 0..{int(ctx.numel()) - 1}: the context must "
                                "keep at least one token that is removed")


RANK_METHODS = ("svd", "rrr")


def _ridge(keys: Tensor, targets: Tensor, ridge: float, rank: int | None, rank_method: str = "svd") -> LowRankPatch:
    """Ridge least squares ΔW (d_out, d_in) with λ = ridge · mean ‖key‖², factored and compressed: (U, V).

    ``rank`` truncation: "svd" keeps the best rank-r approximation of ΔW itself (Eckart–Young in weight space);
    "rrr" is reduced-rank ridge regression, the minimiser of the same ridge objective under rank(ΔW) ≤ r: with
    the augmented keys [A; √λ I] and targets [T; 0] the objective is a plain least squares, whose rank-r optimum
    projects the full solution's fitted values onto their top-r left singular directions Q (d_out, r):
    ΔW_r = Q Qᵀ ΔW, where Q = top-r eigenvectors of ΔW (AᵀA + λI) ΔWᵀ (Mukherjee & Zhu 2011)."""
    lam = ridge * float(keys.pow(2).sum(-1).mean())
    N, d_in = keys.shape
    if N <= d_in:                                              # dual form: rank ≤ N, K×K solve
        p = static_patch(keys, targets, ridge=lam)
    else:                                                      # primal form: d_in × d_in solve
        G = keys.T @ keys
        rhs = keys.T @ targets
        Wt = torch.linalg.solve(G + lam * torch.eye(d_in, dtype=G.dtype, device=G.device), rhs) if lam > 0 \
            else torch.linalg.pinv(G, hermitian=True) @ rhs
        p = LowRankPatch(Wt.T.contiguous(), torch.eye(d_in, dtype=G.dtype, device=G.device))
    if rank is not None and rank_method == "rrr":
        # fitted values of the augmented system: ‖[A; √λ I] ΔWᵀ‖ has Gram ΔW (AᵀA + λI) ΔWᵀ = (U (VᵀAᵀ)) (…)ᵀ + λ ΔW ΔWᵀ
        F = p.U @ (keys @ p.V).T                                             # (d_out, N) = ΔW Aᵀ
        M = F @ F.T + lam * (p.U @ (p.V.T @ p.V) @ p.U.T)                    # (d_out, d_out)
        Q = torch.linalg.eigh(M)[1][:, -rank:]                               # top-r eigenvectors
        p = LowRankPatch(Q, p.V @ (p.U.T @ Q))                               # Q Qᵀ ΔW = Q (ΔWᵀ Q)ᵀ
    p = p.compress(max_rank=rank)
    return LowRankPatch(p.U.contiguous(), p.V.contiguous())


def _fit_layer(model, block, lp: LayerPatch, zc: Tensor, rc: Tensor, ids, pos, valid, *, slot, conv1d, ridge, rank,
               cd, attention_mask=None, attn: nn.Module | None = None, rank_method: str = "svd"):
    """One context-free pass, stopped after block ℓ; fills ``lp`` (layer ℓ's patches) from inside the hooks.

    ``attn``: the attention output projection W_o; if given, ΔW_o is fitted first (keys a = its input, targets
    r_C − r with r = block input + W_o a) and applied at once, so the MLP's fit sees the corrected residual."""
    state: dict[str, Tensor] = {}
    b = block

    def block_pre(mod, args, kwargs):
        state["h"] = first_arg(args, kwargs).to(cd)

    def attn_out(mod, args, out):
        vm = valid.to(out.device)
        a = args[0].to(cd)[vm]
        r = state["h"][vm] + out.to(cd)[vm]
        lp.attn_out = _ridge(a, rc.to(device=out.device, dtype=cd)[vm] - r, ridge, rank, rank_method)
        return out + side_path(lp.attn_out, args[0], cd).to(out.dtype)

    def mlp_pre(mod, args, kwargs):
        z = first_arg(args, kwargs).to(cd)
        vm = valid.to(z.device)
        zk = z[vm]
        dz = zc.to(device=z.device, dtype=cd)[vm] - zk
        for name, m in b.inputs.items():
            W = linear_weight(m, conv1d).to(cd)
            lp.inputs[name] = _ridge(zk, dz @ W.T, ridge, rank, rank_method)
        state["delta"] = rc.to(device=z.device, dtype=cd)[vm] - state["r"][vm]
        if slot == "bias":
            lp.out_bias = state["delta"].mean(0)
            raise _Stop

    def out_weight(mod, args, out):
        g = args[0].to(cd)[valid.to(args[0].device)]
        lp.out_weight = _ridge(g, state["delta"], ridge, rank, rank_method)
        raise _Stop

    def out_scale(mod, args, out):
        u = rms_unit(args[0].to(cd), norm_eps(mod))[valid.to(args[0].device)]
        uu = u.pow(2)
        lp.out_scale = (state["delta"] * u).sum(0) / (uu.sum(0) + ridge * uu.mean(0))
        raise _Stop

    H = tap_residual(b, lambda r: state.__setitem__("r", r), lambda x: x.to(cd))
    if attn is not None:
        H += [b.block.register_forward_pre_hook(block_pre, with_kwargs=True), attn.register_forward_hook(attn_out)]
    H.append(b.mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True))
    if slot == "weight":
        H.append(b.output.register_forward_hook(out_weight))
    elif slot == "scale":
        H.append(b.scale_norm.register_forward_hook(out_scale))
    try:
        run_model(model, get_adapter(model), ids, position_ids=pos, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in H:
            h.remove()
    if not all(torch.isfinite(v).all() for v in lp.tensors().values()):
        raise ContextPatchError(f"layer {b.index}: the static fit produced NaN/inf (degenerate keys); "
                                "use a positive ridge")


def fit_layers(model: nn.Module, zc: list[Tensor], rc: list[Tensor], ids: Tensor, pos: Tensor, valid: Tensor, *,
               slot: str, ridge: float, rank: int | None, attention_mask: Tensor | None = None,
               progress: Callable[[int], None] | None = None, attention: bool = False,
               rank_method: str = "svd") -> list[LayerPatch]:
    """The layer-by-layer ridge fit: block ℓ is fitted on the context-free states that the already fitted
    blocks < ℓ produce (their patches applied), against the with-context targets ``zc[ℓ]``, ``rc[ℓ]``
    (``attention``: also ΔW_o on the attention output projection, first in each block)."""
    adapter = get_adapter(model)
    cd = compute_dtype(next(model.parameters()).dtype)
    blocks = adapter.resolve(model)
    layers = [LayerPatch() for _ in blocks]
    path = attention_path(model) if attention else None
    attns = attention_modules(model, path) if attention else [None] * len(blocks)
    handles = static_hooks(model, layers, slot, path)      # applies layers < ℓ (and ℓ's patches once fitted)
    try:
        for b in blocks:
            _fit_layer(model, b, layers[b.index], zc[b.index], rc[b.index], ids, pos, valid, slot=slot,
                       conv1d=adapter.conv1d, ridge=ridge, rank=rank, cd=cd, attention_mask=attention_mask,
                       attn=attns[b.index], rank_method=rank_method)
            if progress is not None:
                progress(b.index)
    finally:
        for h in handles:
            h.remove()
    return layers


def check_rank(model: nn.Module, rank: int | None) -> None:
    """``rank`` is None or 1..min(d_out, d_in) of every patched matrix."""
    if rank is None:
        return
    if rank < 1:
        raise ContextPatchError(f"rank must be ≥ 1 (or None for full rank), got {rank}")
    adapter = get_adapter(model)
    b0 = adapter.resolve(model)[0]
    for name, mod in list(b0.inputs.items()) + ([("output", b0.output)] if b0.output is not None else []):
        d_out, d_in = linear_weight(mod, adapter.conv1d).shape
        if rank > min(d_out, d_in):
            raise ContextPatchError(f"rank={rank} exceeds the {d_out}×{d_in} matrix {name}: at most "
                                    f"{min(d_out, d_in)} (or rank=None for full rank)")


def fit_static(model: nn.Module, context_ids: Tensor, calibration_queries: Sequence[Tensor] | Tensor, *,
               ridge: float = 1e-3, rank: int | None = None, output_patch: str | OutputPatch = "auto",
               seed: int | None = None, keep_prefix: int = 0, renumber_positions: bool = False,
               attention: bool = False, rank_method: str = "svd",
               progress: Callable[[int], None] | None = None) -> StaticPatches:
    """Fit a static (query-independent) adapter of ``context_ids`` on calibration queries, layer by layer.

    Args:
        context_ids: (n,) the fixed context.
        calibration_queries: K id tensors (lengths may differ) or a (K, T) tensor; each is a continuation of the
            context (its with-context targets sit at positions n..n+T−1).
        ridge: λ = ridge · mean ‖key‖² (0: minimum-norm least squares; one calibration token is then reproduced
            exactly).
        rank: keep at most this rank per matrix; None: full.
        rank_method: how ``rank`` truncates: "svd" (default): the best rank-r approximation of the ridge solution
            ΔW (weight space); "rrr": reduced-rank ridge regression, the best rank-r patch for the fit's own
            objective (the error on the calibration tokens' outputs, plus the ridge term).
        output_patch: "auto" (bias if the MLP output matrix has one, else weight; Gemma-2/3: scale), "bias",
            "weight".
        seed: recorded in the metadata (e.g. the seed that drew random calibration queries).
        keep_prefix: the first ``keep_prefix`` context tokens stay in the context-free input (e.g. 1 for BOS, or a
            chat template's opening tokens), as a user or server runs the model without the context; the adapter
            is fitted to leave them unchanged. Like ``extract``'s ``bos_is_context=False``.
        renumber_positions: False (default): the query keeps its with-context positions n..n+T−1; True: the
            context-free input [kept prefix, query] runs at positions 0.. (the drop-in setting:
            ``keep_prefix=1, renumber_positions=True``).
        attention: also fit a patch ΔW_o on every block's attention output projection (o_proj / c_proj), by the
            same ridge least squares on its input a against the residual mismatch r_C − r right after attention,
            before the MLP's fit (``_attention_slot.py``; GPT-2 and Llama-like families). Exported by ``to_peft``
            and ``merge`` like the MLP matrices.
        progress: called with each finished layer index.
    """
    require_hf_model(model)
    adapter = get_adapter(model)
    if adapter.slot_kind == "moe":
        raise ContextPatchError(f"static adapters do not support MoE yet ({adapter.name}): the router's top-k "
                                "choice is not linear in a static patch; use extract() for exact per-token patches")
    ctx = check_context(model, adapter, context_ids)
    path = attention_path(model) if attention else None
    if not ridge >= 0:
        raise ContextPatchError(f"ridge must be ≥ 0, got {ridge}")
    check_rank(model, rank)
    if rank_method not in RANK_METHODS:
        raise ContextPatchError(f"rank_method must be one of {RANK_METHODS}, got {rank_method!r}")
    slot = resolve_slot(adapter, model, output_patch)
    if slot == "stable":       # the stable variant is a per-token construction; a static fit uses the scale slot
        slot = "scale"
    ids, valid = _queries(calibration_queries, model, "calibration")
    _check_prefix(ctx, keep_prefix)
    zc, rc, _ = _packed(model, ctx, ids, need_output=False)
    if keep_prefix:
        pz, pr = _prefix_targets(model, ctx, ids.shape[0], keep_prefix)
        zc = [torch.cat([a.to(b.device), b], 1) for a, b in zip(pz, zc, strict=True)]
        rc = [torch.cat([a.to(b.device), b], 1) for a, b in zip(pr, rc, strict=True)]
    ids, pos, valid = _context_free_batch(model, ctx, ids, valid, keep_prefix, renumber_positions)
    layers = fit_layers(model, zc, rc, ids, pos, valid, slot=slot, ridge=float(ridge), rank=rank, progress=progress,
                        attention=attention, rank_method=rank_method)
    meta = build_meta(model, adapter, slot, kind="static",
                      variant="static adapter: ridge least squares over calibration tokens",
                      context_ids=[int(t) for t in ctx.tolist()], context_length=int(ctx.numel()),
                      num_calibration_queries=int(ids.shape[0]), num_calibration_tokens=int(valid.sum()),
                      keep_prefix=keep_prefix, renumber_positions=renumber_positions,
                      query_positions="p..p+T-1" if renumber_positions else "n..n+T-1", ridge=float(ridge),
                      **({"rank_method": rank_method} if rank_method != "svd" else {}),
                      ridge_convention="lambda = ridge * mean ||key||^2", rank=rank, seed=seed, conv1d=adapter.conv1d,
                      **({"attention": True, "attention_module": path} if attention else {}))
    return StaticPatches(layers, meta)


def _metrics(a: Tensor, ref: Tensor) -> dict[str, float]:
    a, ref = a.double(), ref.double()
    lp, lq = ref.log_softmax(-1), a.log_softmax(-1)
    return {"mean_abs_diff": float((a - ref).abs().mean()), "max_abs_diff": float((a - ref).abs().max()),
            "kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "top1_agreement": float((a.argmax(-1) == ref.argmax(-1)).double().mean())}


def evaluate_static(model: nn.Module, static: StaticPatches, context_ids: Tensor,
                    queries: Sequence[Tensor] | Tensor, *, keep_prefix: int | None = None,
                    renumber_positions: bool | None = None) -> dict:
    """Measure a static adapter on (held-out) queries against the with-context logits.

    Compares the logits of each query run WITHOUT the context (after the kept prefix, at the positions of
    ``keep_prefix`` / ``renumber_positions``, by default those of the fit) with the adapter applied, and without
    it (the control), to the logits of the query after the whole context (one packed pass). Returns, over all
    query tokens:
    ``mean_abs_diff``, ``max_abs_diff`` (|Δlogit|), ``kl`` (mean KL(with-context ‖ static) of the next-token
    distributions), ``top1_agreement``, the same four with prefix ``control_`` (no adapter, no context),
    ``num_queries``, ``num_tokens`` and ``same_context`` (whether ``context_ids`` is the fitted context).
    """
    require_hf_model(model)
    static.check_model(model)
    adapter = get_adapter(model)
    ctx = check_context(model, adapter, context_ids)
    ids, valid = _queries(queries, model, "evaluation")
    dev = next(model.parameters()).device
    opts = static.meta.options
    p = opts.get("keep_prefix", 0) if keep_prefix is None else keep_prefix
    renumber = opts.get("renumber_positions", False) if renumber_positions is None else renumber_positions
    _check_prefix(ctx, p)
    _, _, ref = _packed(model, ctx, ids, need_output=True)
    full, pos, _ = _context_free_batch(model, ctx, ids, valid, p, renumber)
    with static.applied(model):
        out = model_output(run_model(model, adapter, full, position_ids=pos))[:, p:]
    control = model_output(run_model(model, adapter, full, position_ids=pos))[:, p:]
    vm = valid.to(dev)
    res = _metrics(out[vm], ref[vm])
    res.update({"control_" + k: v for k, v in _metrics(control[vm], ref[vm]).items()})
    res.update(num_queries=int(ids.shape[0]), num_tokens=int(valid.sum()), keep_prefix=p, renumber_positions=renumber,
               same_context=ctx.cpu().tolist() == static.meta.options.get("context_ids"))
    return res
