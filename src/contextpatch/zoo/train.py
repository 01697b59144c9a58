"""Training a zoo model on CPU: AdamW, cosine learning rate with linear warmup, answer-only loss.

Loss (answer-only): ``L = Σ_t w_t · CE(logits_{t-1}, ids_t) / Σ_t w_t`` with ``w_t = 1`` on answer tokens
(queries' answers, and the clean demonstration answers of ``function``/``instruction`` when ``demo_targets``),
0 elsewhere. Learning rate at step ``s`` (of ``S``): ``lr·s/W`` for ``s < W``, then
``lr·(r + (1-r)·(1 + cos(π·(s-W)/(S-W)))/2)`` with ``r = min_lr_ratio``.
With ``teacher`` set, the objective adds the teacher's attention and next-token KL terms (``zoo/teacher.py``).

Resumable: ``OUT/checkpoint/state.pt`` holds model + optimizer + torch RNG state + step + config + elapsed time
(one file, written atomically). Data is a pure function of ``(seed, step)``, so resuming is bit-exact.
The result is a standard HF folder: ``config.json``, ``model.safetensors`` (float32), tokenizer files and
``zoo.json`` (config, seed, steps, wall time, tokens/s, final metrics).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .._errors import ContextPatchError
from .._io import atomic_write_json, atomic_write_with, ensure_out_dir
from .config import ZOO_FORMAT, TrainConfig
from .data import answer_loss, sample_batch, tasks_for
from .models import count_params, make_model, sinusoid_positions
from .teacher import distill_loss, load_teacher

__all__ = ["TrainConfig", "train", "lr_at", "loss_fn", "estimate_steps", "checkpoint_model", "finish_from_checkpoint",
           "ZOO_FORMAT"]

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Warmup then cosine decay to ``lr·min_lr_ratio`` (formula in the module docstring)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    f = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, f))))


def loss_fn(model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy of ``model`` on a batch (``data.answer_loss``)."""
    return answer_loss(model(input_ids=ids).logits, ids, weights)


def _make(cfg: TrainConfig):
    model = make_model(cfg.arch, seed=cfg.seed, width=cfg.width, layers=cfg.layers, heads=cfg.heads, mlp=cfg.mlp)
    if cfg.position_init not in ("normal", "sinusoid"):
        raise ContextPatchError(f"position_init must be 'normal' or 'sinusoid', got {cfg.position_init!r}")
    if cfg.position_init == "sinusoid":
        if cfg.arch != "gpt2":
            raise ContextPatchError("position_init='sinusoid' is for GPT-2 (learned positions); Llama uses RoPE")
        wpe, wte = model.transformer.wpe.weight, model.transformer.wte.weight
        with torch.no_grad():
            wpe.copy_(sinusoid_positions(*wpe.shape, row_norm=float(wte.norm(dim=-1).mean())))
    # training only (≈1.3× faster on CPU); saved and shipped as eager. Attention transfer needs the eager weights.
    model.set_attn_implementation("eager" if cfg.teacher and cfg.attn_weight > 0 else "sdpa")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    return model, opt


def _batch_loss(model, teacher, cfg: TrainConfig, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The training objective of one batch: the answer loss, plus the teacher's terms when ``cfg.teacher``."""
    if teacher is None:
        return loss_fn(model, ids, w)
    return distill_loss(model, teacher, ids, w, attn_weight=cfg.attn_weight, logit_weight=cfg.logit_weight)[0]


def _diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (now)" for k in keys if a.get(k) != b.get(k))


def _save_checkpoint(path: Path, model, opt, step: int, cfg: TrainConfig, elapsed: float, tokens: int,
                     history: list) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
             "step": step, "config": cfg.to_dict(), "elapsed": elapsed, "tokens": tokens, "history": history}
    atomic_write_with(path / "state.pt", lambda p: torch.save(state, p))


def estimate_steps(cfg: TrainConfig, minutes: float, *, probe_steps: int = 5) -> int:
    """Steps that fit in ``minutes`` on this machine: times ``probe_steps`` steps (after one untimed step)
    spread over the curriculum on a throwaway model, then scales; the final evaluation is not counted."""
    from dataclasses import replace

    model, opt = _make(cfg)
    teacher = load_teacher(cfg.teacher, model) if cfg.teacher else None
    nominal = replace(cfg, steps=1000)
    tasks = tasks_for(cfg)
    at = [0] + [int(1000 * (i + 0.5) / probe_steps) for i in range(probe_steps)]
    t0 = 0.0
    for i, s in enumerate(at):
        if i == 1:
            t0 = time.perf_counter()
        ids, w = sample_batch(nominal, s, tasks)
        _batch_loss(model, teacher, cfg, ids, w).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_step = (time.perf_counter() - t0) / probe_steps
    return max(cfg.warmup_steps + 1, int(minutes * 60 / per_step))


def train(cfg: TrainConfig, out: Path | str, *, resume: bool = False, progress: bool = True,
          checkpoint_every: int = 100, eval_examples: int = 50, on_step=None) -> dict:
    """Train ``cfg`` into the HF folder ``out`` (checkpoint in ``out/checkpoint``); returns the zoo.json dict.

    ``resume``: continue from ``out/checkpoint/state.pt``; a checkpoint written with another config raises
    ``ContextPatchError`` naming the differing fields. ``eval_examples`` per (family, shots) point of the
    final evaluation (0 skips it). ``on_step(step, loss)`` is called after every step (tests, logging).
    """
    from tqdm.auto import tqdm

    out = ensure_out_dir(out)
    ck = out / "checkpoint"
    model, opt = _make(cfg)
    step, elapsed, tokens, history = 0, 0.0, 0, []
    if resume:
        if not (ck / "state.pt").is_file():
            raise ContextPatchError(f"--resume: no checkpoint at {ck / 'state.pt'} (train without --resume first)")
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
        # through TrainConfig: a checkpoint written before a field existed resumes with that field's default
        saved = TrainConfig.from_dict(state["config"]).to_dict()
        if saved != cfg.to_dict():
            raise ContextPatchError(f"cannot resume from {ck}: it was written with a different configuration "
                                    f"({_diff(saved, cfg.to_dict())}); use the same settings or "
                                    f"another output folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, tokens, history = state["step"], state["elapsed"], state["tokens"], state["history"]
    elif cfg.init_from:
        _load_parent(model, cfg.init_from)
    tasks = tasks_for(cfg)
    teacher = load_teacher(cfg.teacher, model) if cfg.teacher else None
    model.train()
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    bar = tqdm(total=end, initial=step, disable=not progress, desc=cfg.name, dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    while step < end:
        ids, w = sample_batch(cfg, step, tasks)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = _batch_loss(model, teacher, cfg, ids, w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int((ids != 0).sum())
        lv = float(loss.detach())
        if step % 10 == 0 or step == cfg.steps:
            history.append([step, round(lv, 5), round(time.perf_counter() - t0, 2)])
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.3f}", tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):.0f}")
        if step % checkpoint_every == 0 or step == end:
            _save_checkpoint(ck, model, opt, step, cfg, time.perf_counter() - t0, tokens, history)
        if on_step is not None:
            on_step(step, lv)
    bar.close()
    wall = time.perf_counter() - t0
    return finish(model, cfg, out, wall=wall, tokens=tokens, history=history, eval_examples=eval_examples,
                  steps_done=step)


def _load_parent(model, folder: str) -> None:
    """Copy the weights of the zoo model folder ``folder`` into ``model`` (same architecture and sizes)."""
    from safetensors.torch import load_file

    f = Path(folder) / "model.safetensors"
    if not f.is_file() or not (Path(folder) / "zoo.json").is_file():
        raise ContextPatchError(f"init_from={folder!r} is not a zoo model folder (needs model.safetensors and "
                                f"zoo.json)")
    state = load_file(f)
    mine = model.state_dict()
    bad = sorted(k for k in mine if k not in state and not k.endswith("lm_head.weight")
                 or k in state and state[k].shape != mine[k].shape)
    if bad:
        raise ContextPatchError(f"init_from={folder!r} has another architecture or size (differs at {bad[:3]})")
    model.load_state_dict(state, strict=False)
    if "lm_head.weight" not in state:       # tied embeddings (GPT-2): the head shares wte
        model.tie_weights()


def _parent_summary(cfg: TrainConfig) -> dict | None:
    import json

    if not cfg.init_from:
        return None
    meta = json.loads((Path(cfg.init_from) / "zoo.json").read_text())
    return {"folder": cfg.init_from, "name": meta.get("name"), "steps": meta.get("steps"),
            "wall_seconds": meta.get("total_wall_seconds", meta.get("wall_seconds")), "config": meta.get("config"),
            "metrics": meta.get("metrics"), "parent": meta.get("parent")}


def finish(model, cfg: TrainConfig, out: Path, *, wall: float, tokens: int, history: list,
           eval_examples: int = 50, steps_done: int | None = None) -> dict:
    """Evaluate and write the HF folder (files saved in a temp folder, then each moved into place)."""
    from .evaluate import evaluate_model, plot
    from .tokenizer import make_tokenizer

    model.eval()
    model.set_attn_implementation("eager")
    metrics = evaluate_model(model, name=cfg.name, n=eval_examples, config=cfg) if eval_examples > 0 else None
    meta = {"zoo_format": ZOO_FORMAT, "name": cfg.name, "arch": cfg.arch, "probe": cfg.probe, "seed": cfg.seed,
            "steps": cfg.steps, "steps_done": cfg.steps if steps_done is None else steps_done,
            "parameters": count_params(model), "wall_seconds": round(wall, 1),
            "tokens_seen": tokens, "tokens_per_second": round(tokens / max(wall, 1e-9), 1),
            "torch_threads": torch.get_num_threads(), "config": cfg.to_dict(), "metrics": metrics,
            "eval_examples": eval_examples, "eval_seed": 1234, "parent": _parent_summary(cfg),
            "loss_history": history}
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_tokenizer().save_pretrained(tmp)
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), out / f)
    if meta["parent"] is not None:
        meta["total_wall_seconds"] = round(wall + (meta["parent"]["wall_seconds"] or 0.0), 1)
    atomic_write_json(out / "zoo.json", meta)
    if metrics is not None:
        plot(metrics, out / "accuracy.png")
    return meta


def remove_checkpoint(out: Path | str) -> None:
    """Delete ``out/checkpoint`` (what ships is the HF folder only)."""
    shutil.rmtree(Path(out) / "checkpoint", ignore_errors=True)


def finish_from_checkpoint(out: Path | str, *, eval_examples: int = 50) -> dict:
    """Write the HF folder and zoo.json of an interrupted run from ``out/checkpoint`` as it stands (``steps_done``
    records where it stopped; ``steps`` stays the planned count that set the learning-rate schedule)."""
    model, info = checkpoint_model(out)
    state = torch.load(Path(out) / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    return finish(model, TrainConfig.from_dict(info["config"]), Path(out), wall=state["elapsed"],
                  tokens=state["tokens"], history=state["history"], eval_examples=eval_examples,
                  steps_done=state["step"])


def checkpoint_model(out: Path | str) -> tuple[torch.nn.Module, dict]:
    """(eager float32 model in eval mode, checkpoint summary) from ``out/checkpoint/state.pt`` of a run in
    progress, e.g. to evaluate a model while it trains."""
    state_path = Path(out) / "checkpoint" / "state.pt"
    if not state_path.is_file():
        raise ContextPatchError(f"no checkpoint at {state_path}")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    model = make_model(cfg.arch, seed=cfg.seed, width=cfg.width, layers=cfg.layers, heads=cfg.heads, mlp=cfg.mlp)
    model.load_state_dict(state["model"])
    return model.eval(), {"step": state["step"], "elapsed": state["elapsed"], "config": cfg.to_dict()}
