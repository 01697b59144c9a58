"""Figures of the zoo study (Agg backend, PNG written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._io import save_figure  # noqa: E402

__all__ = ["plot_dynamics", "plot_thought", "plot_finetune"]


def plot_dynamics(m: dict, path: Path | str) -> None:
    """Accuracy/loss over shots next to the per-layer implicit patch and update norms."""
    d = m["dynamics"]
    k = np.asarray(d["shots"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    ax = axes[0]
    ax.plot(k, d["accuracy"], "o-", ms=3, label="exact-answer accuracy")
    ax.set_xlabel("demonstrations i in the context")
    ax.set_ylabel("accuracy (function induction)")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(k, d["answer_nll"], color="C3", lw=1, label="−log p(answer)")
    ax2.set_ylabel("answer NLL", color="C3")
    ax.set_title(f"{m['model']}: accuracy over shots")
    ax.legend(loc="center right", fontsize=8)
    for li in range(len(d["matrices"])):
        axes[1].plot(k, d["patch_rel"][li], label=f"layer {li}")
        axes[2].plot(k[1:], d["step_rel"][li], label=f"layer {li}")
    axes[1].set_xlabel("demonstrations i")
    axes[1].set_ylabel("‖ΔW_i‖_F / ‖W‖_F")
    axes[1].set_title("implicit patch of the first MLP matrix")
    axes[2].set_xlabel("demonstration i")
    axes[2].set_ylabel("‖ΔW_i − ΔW_{i−1}‖_F / ‖W‖_F")
    axes[2].set_yscale("log")
    axes[2].set_title("implicit update per demonstration")
    for a in axes[1:]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    save_figure(fig, path)


def plot_thought(m: dict, path: Path | str) -> None:
    """Held-out accuracy of the static thought patch vs K, per family, against with/without context."""
    t = m["thought_patch"]
    fig, axes = plt.subplots(1, len(t), figsize=(4.6 * len(t), 3.6), squeeze=False, layout="constrained")
    for ax, (fam, r) in zip(axes[0], t.items(), strict=True):
        ax.plot(r["ks"], r["held_out_accuracy"], "o-", label="static patch, held-out queries")
        if fam != "instruction":
            ax.plot(r["ks"], r["asked_accuracy"], "s--", ms=3, label="static patch, calibration queries")
        ax.axhline(r["with_context_accuracy"], color="tab:green", ls="--", label="with the context")
        ax.axhline(r["without_context_accuracy"], color="tab:red", ls=":", label="without the context")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("calibration queries K")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_title(f"{m['model']}: {fam}")
    axes[0][0].legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_finetune(m: dict, path: Path | str) -> None:
    """Query loss under online SGD vs with the context, and the per-layer alignment of SGD with the implicit
    increments."""
    f = m["finetune"]
    k = np.arange(len(f["query_nll_sgd"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    axes[0].plot(k, f["query_nll_with_context"], "o-", ms=3, label="implicit (= with the context)")
    axes[0].plot(k, f["query_nll_sgd"], "s-", ms=3, label=f"explicit online SGD (η = {f['lr']:g})")
    axes[0].set_xlabel("demonstrations seen i")
    axes[0].set_ylabel("query −log p(answer)")
    axes[0].set_title(f"{m['model']}: query loss")
    axes[0].legend(fontsize=8)
    for li, _ in enumerate(f["matrices"]):
        axes[1].plot(k[1:], f["alignment_step"][li], label=f"layer {li}")
        axes[2].plot(k[1:], f["alignment_cumulative"][li], label=f"layer {li}")
    axes[1].set_ylabel("cos(SGD step, ΔW_i − ΔW_{i−1})")
    axes[1].set_title("per-step alignment")
    axes[2].set_ylabel("cos(W_i^SGD − W, ΔW_i)")
    axes[2].set_title("cumulative alignment")
    for a in axes[1:]:
        a.axhline(0, color="gray", lw=0.8)
        a.set_xlabel("demonstration i")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    save_figure(fig, path)
