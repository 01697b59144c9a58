"""Gradient context distillation with LoRA: the anchor a static adapter is measured against (issue: adapters).

The student is the model WITHOUT the context plus a peft LoRA adapter; the teacher is the same model WITH the
context (Snell et al. 2022, "Learning by Distilling Context"; Bhargava et al. 2024, "Prompt Baking"):

    loss = mean over the calibration queries' tokens of KL( p(· | context, q_<t) ‖ p_LoRA(· | q_<t) )

Adam on the LoRA factors only. ``init=static`` starts from a fitted :class:`StaticPatches`: the hybrid of the
closed form and distillation, in one of two forms (``init_mode``):

    "factors"   the LoRA factors start AT the static adapter (A = Vᵀ, B = U, the mapping of
                ``StaticPatches.to_peft``) and are trained; the student is one LoRA of the static adapter's ranks
    "residual"  the static adapter is merged into the (frozen) base and a fresh LoRA of ``rank`` on ``targets``
                (B = 0: the student starts exactly at the static adapter) is trained on top: the same trainable
                parameters, initialisation and learning rate as plain distillation, started from the closed form

The teacher logits come from one packed with-context pass; the student runs the queries alone at the fitted
positions (or the drop-in convention of the static adapter). Every ``eval_every`` steps the held-out KL and top-1
agreement are recorded with the training wall time (evaluation excluded) and the number of forward/backward passes.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError
from ..adapters import get_adapter
from ._static_fit import query_batch, teacher_logits
from ._static_patches import StaticPatches

__all__ = ["DistillResult", "distill_lora"]


@dataclass
class DistillResult:
    """history: one dict per evaluation {step, wall_s, forward_backward, kl, top1, calibration_kl (the training
    loss of the last step, before its update; None at step 0)}; model: the trained student
    (a peft model wrapping a copy of the base model); config: the settings (JSON values)."""

    history: list[dict]
    model: nn.Module
    config: dict = field(default_factory=dict)


def _kl(teacher: Tensor, student: Tensor, valid: Tensor) -> Tensor:
    lp, lq = teacher.float().log_softmax(-1), student.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl[valid].mean()


def distill_lora(model: nn.Module, context_ids: Tensor, calibration_queries: Sequence[Tensor] | Tensor,
                 eval_queries: Sequence[Tensor] | Tensor, *, rank: int = 4, targets: str = "mlp", steps: int = 100,
                 lr: float = 1e-3, init: StaticPatches | None = None, init_mode: str = "factors",
                 eval_every: int = 10,
                 seed: int = 0, keep_prefix: int | None = None, renumber_positions: bool | None = None,
                 eval_metrics: Callable[[Tensor], dict] | None = None) -> DistillResult:
    """Distil ``context_ids`` into a LoRA adapter of ``rank`` on ``targets`` ("mlp": the matrices the static
    adapter patches; "all-linear": every linear layer), ``steps`` full-batch Adam steps.

    ``init``: a static adapter of the same context to start from; ``init_mode`` "factors" (its ranks are kept;
    ``targets`` must be "mlp") or "residual" (merged into the frozen base, a fresh LoRA on top; module docstring).
    ``keep_prefix`` / ``renumber_positions``: the student's input convention (as in :func:`fit_static`; default:
    the one ``init`` was fitted with, else the query alone at positions n..). ``eval_metrics``: called at every
    evaluation with the held-out logits (K, T, V) of the query tokens; its dict is merged into the history row.
    """
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ContextPatchError("distillation needs the peft package: pip install 'contextpatch[peft]'") from None
    if steps < 0 or eval_every < 1 or rank < 1 or lr <= 0:
        raise ContextPatchError("need steps ≥ 0, eval_every ≥ 1, rank ≥ 1 and lr > 0")
    if targets not in ("mlp", "all-linear"):
        raise ContextPatchError(f"targets must be 'mlp' or 'all-linear', got {targets!r}")
    if init_mode not in ("factors", "residual"):
        raise ContextPatchError(f"init_mode must be 'factors' or 'residual', got {init_mode!r}")
    torch.manual_seed(seed)
    ctx = torch.as_tensor(context_ids).reshape(-1)
    opts = init.meta.options if init is not None else {}
    keep = opts.get("keep_prefix", 0) if keep_prefix is None else keep_prefix
    renumber = opts.get("renumber_positions", False) if renumber_positions is None else renumber_positions
    if init is not None and (keep, renumber) != (opts.get("keep_prefix", 0), opts.get("renumber_positions", False)):
        raise ContextPatchError("init=static: the student must use the convention the static adapter was fitted "
                                f"with (keep_prefix={opts.get('keep_prefix', 0)}, "
                                f"renumber_positions={opts.get('renumber_positions', False)})")
    cal = query_batch(model, ctx, calibration_queries, keep, renumber, "calibration")
    ev = query_batch(model, ctx, eval_queries, keep, renumber, "evaluation")
    t_cal, t_ev = teacher_logits(model, ctx, cal), teacher_logits(model, ctx, ev)
    base = copy.deepcopy(model)
    if init is not None and init_mode == "residual":
        init.merge(base, inplace=True)
    if init is not None and init_mode == "factors":
        if targets != "mlp":
            raise ContextPatchError("init=static starts from the static adapter's own matrices: use targets='mlp'")
        with tempfile.TemporaryDirectory() as d:
            init.to_peft(model, f"{d}/a")
            student = PeftModel.from_pretrained(base, f"{d}/a", is_trainable=True)
    else:
        adapter = get_adapter(model)
        blocks = adapter.resolve(base)
        base_names = {id(m): n for n, m in base.named_modules()}
        if targets == "mlp":
            mods = [base_names[id(m)] for b in blocks for m in list(b.inputs.values()) + [b.output]]
        else:
            mods = "all-linear"
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=mods, lora_dropout=0.0,
                            fan_in_fan_out=adapter.conv1d)
        student = get_peft_model(base, config)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history, wall, passes, last_loss = [], 0.0, 0, None

    def evaluate(step: int) -> None:
        student.eval()
        with torch.no_grad():
            out = student(input_ids=ev.ids, position_ids=ev.pos).logits[:, ev.p:]
        student.train()
        top1 = (out.argmax(-1) == t_ev.argmax(-1))[ev.valid].double().mean()
        row = {"step": step, "wall_s": wall, "forward_backward": passes,
               "kl": float(_kl(t_ev, out, ev.valid)), "top1": float(top1), "calibration_kl": last_loss}
        if eval_metrics is not None:
            row.update(eval_metrics(out))
        history.append(row)

    evaluate(0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        out = student(input_ids=cal.ids, position_ids=cal.pos).logits[:, cal.p:]
        loss = _kl(t_cal, out, cal.valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        wall += time.perf_counter() - t0
        passes += 1
        last_loss = float(loss.detach())
        if step % eval_every == 0 or step == steps:
            evaluate(step)
    student.eval()
    return DistillResult(history, student, {"rank": rank, "targets": targets, "steps": steps, "lr": lr,
                                            "init": f"static ({init_mode})" if init is not None else "lora-default",
                                            "seed": seed, "keep_prefix": keep, "renumber_positions": renumber})
