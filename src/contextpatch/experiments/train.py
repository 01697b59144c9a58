"""Training on in-context linear regression, with validation through the patched pass and resumable state.

Loss: mean squared error of the query prediction. Optimiser: Adam (β = 0.9, 0.999), linear warm-up then cosine
decay to 0, gradient-norm clipping, float32, a fresh batch of prompts each step drawn from a generator seeded by
(seed, step) so that ``--resume`` continues exactly. Every ``eval_every`` steps the validation MSE is computed
twice on a fixed validation set: with the context, T_W(C, x), and without it through the patches, T_{W+ΔW}(x).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._errors import ContextPatchError
from .config import ModelConfig, TaskConfig, TrainConfig, as_dict
from .data import batch_generator, sample_prompts
from .models import Checkpoint, ICLModel, build_model, load_checkpoint, save_checkpoint
from .report import atomic_write_bytes

__all__ = ["train_model", "evaluate", "state_path"]


def state_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".state.pt")


@torch.no_grad()
def evaluate(model: ICLModel, prompts) -> tuple[float, float]:
    """(validation MSE with the context, validation MSE of T_{W+ΔW}(x) without it)."""
    model.eval()
    mse = float(((model.predict(prompts.tokens) - prompts.yq) ** 2).mean())
    patches = model.query_patches(prompts.tokens)
    out, _ = model.patched_output(prompts.query, patches)
    mse_p = float(((out[..., -1] - prompts.yq) ** 2).mean())
    model.train()
    return mse, mse_p


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_model(name: str, model_cfg: ModelConfig, task: TaskConfig, cfg: TrainConfig, out_dir: Path | str, *,
                resume: bool = False, progress: bool = True, preset: str = "") -> Checkpoint:
    """Train one model; writes ``out_dir/name.{safetensors,json}`` and the resumable ``name.state.pt``."""
    torch.set_default_dtype(torch.float32)
    stem = Path(out_dir) / name
    model = build_model(model_cfg, task, seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, list] = {"step": [], "train_loss": [], "val_step": [], "val_loss": [],
                                "val_loss_patched": [], "wall_s": []}
    start, elapsed0 = 0, 0.0
    sp = state_path(stem)
    if resume:
        if not sp.is_file():
            raise ContextPatchError(f"--resume: no training state at {sp}; start without --resume")
        st = torch.load(sp, weights_only=True)
        if st["model_cfg"] != as_dict(model_cfg) or st["task"] != as_dict(task) or st["train"] != as_dict(cfg):
            raise ContextPatchError(f"--resume: the state at {sp} was written with a different configuration")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        history, start, elapsed0 = st["history"], int(st["step"]), float(st["elapsed"])
    val = sample_prompts(cfg.n_val, task.n_context, task.d, generator=torch.Generator().manual_seed(10_000 + cfg.seed))

    def save_state(step: int, elapsed: float) -> None:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history,
                    "elapsed": elapsed, "model_cfg": as_dict(model_cfg), "task": as_dict(task),
                    "train": as_dict(cfg)}, buf)
        atomic_write_bytes(sp, buf.getvalue())
        save_checkpoint(stem, model, train=cfg, history=history, step=step,
                        extra={"name": name, "preset": preset, "train_wall_s": elapsed})

    model.train()
    t0 = time.perf_counter()
    window: list[float] = []
    bar = tqdm(range(start, cfg.steps), total=cfg.steps, initial=start, desc=f"train {name}", disable=not progress,
               unit="step", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = sample_prompts(cfg.batch_size, task.n_context, task.d, generator=batch_generator(cfg.seed, step))
        loss = ((model.predict(batch.tokens) - batch.yq) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(float(loss.detach()))
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            v, vp = evaluate(model, val)
            history["step"].append(done)
            history["train_loss"].append(sum(window) / len(window))
            history["val_step"].append(done)
            history["val_loss"].append(v)
            history["val_loss_patched"].append(vp)
            history["wall_s"].append(elapsed0 + time.perf_counter() - t0)
            window = []
            bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=f"{v:.3f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_state(done, elapsed0 + time.perf_counter() - t0)
    bar.close()
    if start >= cfg.steps:  # nothing left to do: make sure the checkpoint exists
        save_state(start, elapsed0)
    return load_checkpoint(stem)
