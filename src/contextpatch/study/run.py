"""``contextpatch study``: the paper's experiments on a zoo language model, in one command.

Writes into ``out``: ``metrics.json`` (every number, the settings and seeds), ``exactness``/``dynamics``/
``thought_patch``/``finetune`` figures (PNG) and ``report.md``. Presets: ``full`` (≈ 2–4 min on 2 CPU cores for
the shipped zoo models: 100 prompts per family for exactness, 32 prompts for the dynamics, 3 contexts × 7 values
of K for thought patches, 16 + 8 prompts for fine-tuning) and ``quick`` (CI: a few prompts each, seconds).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._errors import ContextPatchError
from .._io import atomic_write_json, atomic_write_text, ensure_out_dir
from .dynamics import LRS, explicit_finetune, implicit_dynamics
from .exactness import exactness
from .figures import plot_dynamics, plot_finetune, plot_thought
from .report import render_report
from .thought import KS, thought_patches

__all__ = ["StudyConfig", "PRESETS", "run_study"]


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Sizes of each part of the study (``PRESETS``)."""

    exact_prompts: int = 100
    exact_float64: int = 10
    dyn_prompts: int = 32
    dyn_shots: int = 32
    thought_contexts: int = 3
    thought_ks: tuple[int, ...] = KS
    ft_prompts: int = 16
    ft_tune: int = 8
    ft_shots: int = 16
    ft_lrs: tuple[float, ...] = LRS
    seed: int = 0


PRESETS = {
    "full": StudyConfig(),
    "quick": StudyConfig(exact_prompts=4, exact_float64=1, dyn_prompts=3, dyn_shots=8, thought_contexts=1,
                         thought_ks=(1, 8), ft_prompts=2, ft_tune=1, ft_shots=6, ft_lrs=(1e-2, 1e-1)),
}


def run_study(model_name: str | Path, out: Path | str, *, preset: str = "full", seed: int | None = None,
              progress: bool = True) -> dict:
    """Load the zoo model ``model_name`` (a shipped name or a zoo folder), run the four parts, write the outputs;
    returns the metrics dict."""
    from tqdm.auto import tqdm

    from ..zoo.evaluate import load_zoo_model

    if preset not in PRESETS:
        raise ContextPatchError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if seed is not None:
        cfg = StudyConfig(**{**asdict(cfg), "seed": seed})
    model, meta = load_zoo_model(model_name)
    out = ensure_out_dir(out)
    torch.manual_seed(cfg.seed)
    total = (3 * cfg.exact_prompts + cfg.dyn_prompts + 3 * cfg.thought_contexts * len(cfg.thought_ks)
             + len(cfg.ft_lrs) + cfg.ft_prompts)
    bar = tqdm(total=total, disable=not progress, desc="study", dynamic_ncols=True)
    secs = {}

    def timed(name, fn, **kw):
        t0 = time.perf_counter()
        bar.set_description(f"study: {name}")
        r = fn(model, progress=bar.update, **kw)
        secs[name] = round(time.perf_counter() - t0, 2)
        return r

    metrics = {
        "model": meta.get("name", str(model_name)), "arch": meta.get("arch"), "parameters": meta.get("parameters"),
        "zoo_accuracy": (meta.get("metrics") or {}).get("families"),
        "preset": preset, "config": asdict(cfg), "seed": cfg.seed,
        "exactness": timed("exactness", exactness, n=cfg.exact_prompts, n_float64=cfg.exact_float64, seed=cfg.seed),
        "dynamics": timed("dynamics", implicit_dynamics, n=cfg.dyn_prompts, shots=cfg.dyn_shots, seed=cfg.seed),
        "thought_patch": timed("thought_patch", thought_patches, contexts=cfg.thought_contexts,
                               ks=cfg.thought_ks, seed=cfg.seed),
        "finetune": timed("finetune", explicit_finetune, n=cfg.ft_prompts, n_tune=cfg.ft_tune, shots=cfg.ft_shots,
                          lrs=cfg.ft_lrs, seed=cfg.seed),
    }
    bar.close()
    metrics["seconds"] = secs
    metrics["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "python": platform.python_version(), "machine": platform.machine()}
    plot_dynamics(metrics, out / "dynamics.png")
    plot_thought(metrics, out / "thought_patch.png")
    plot_finetune(metrics, out / "finetune.png")
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render_report(metrics))
    return metrics


def headline(metrics: dict) -> dict:
    """The few numbers ``--json`` prints."""
    ex = metrics["exactness"]
    th = metrics["thought_patch"]
    ft = metrics["finetune"]
    return {
        "model": metrics["model"], "preset": metrics["preset"], "seed": metrics["seed"],
        "verify_max_abs_diff_float32": max(r["verify_max_abs_diff_float32"] for r in ex.values()),
        "generation_agreement": {f: r["generation_agreement"] for f, r in ex.items()},
        "accuracy_by_shots_function": metrics["dynamics"]["accuracy"],
        "thought_patch_best_held_out": {f: max(r["held_out_accuracy"]) for f, r in th.items()},
        "thought_patch_with_context": {f: r["with_context_accuracy"] for f, r in th.items()},
        "finetune_lr": ft["lr"], "finetune_alignment_step_mean": ft["alignment_step_mean"],
        "seconds": metrics["seconds"],
    }


def dumps(metrics: dict) -> str:
    return json.dumps(headline(metrics))
