"""Matplotlib figures (Agg backend), saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import save_figure  # noqa: E402

__all__ = ["plot_training_curves", "plot_block_diffs", "plot_finetune", "plot_convergence", "plot_thought_patch"]

_TITLES = {"single": "single block (softmax attention + MLP)", "deep": "10-layer Pre-LN transformer",
           "rnn": "single block (RNN + MLP)"}


def _arr(x) -> np.ndarray:
    return np.asarray([float(v) for v in x], dtype=float)


def plot_training_curves(histories: dict[str, dict], path: Path) -> None:
    names = [n for n, h in histories.items() if h.get("step")]
    n = max(1, len(names))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=False):
        h = histories[name]
        ax.plot(h["step"], h["train_loss"], label="train loss (with context)", color="C0")
        ax.plot(h["val_step"], h["val_loss"], label="validation loss (with context)", color="C1", lw=2)
        ax.plot(h["val_step"], h["val_loss_patched"], "--", label="validation loss via T_{W+ΔW}(x)", color="k", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("query MSE")
        ax.set_title(_TITLES.get(name, name), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Training: the patched context-free pass gives the same validation loss")
    save_figure(fig, path)


def plot_block_diffs(deep: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    L = len(deep["float32"]["per_block_mean_abs_diff"])
    x = np.arange(1, L + 1)
    w = 0.2
    for j, (dt, key, c) in enumerate([("float32", "per_block_mean_abs_diff", "C0"),
                                      ("float32", "per_block_max_abs_diff", "C9"),
                                      ("float64", "per_block_mean_abs_diff", "C3"),
                                      ("float64", "per_block_max_abs_diff", "C1")]):
        v = np.maximum(_arr(deep[dt][key]), 1e-300)
        ax.bar(x + (j - 1.5) * w, v, w, label=f"{dt} {key.split('_')[2]}", color=c)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel("block (layer) of the Pre-LN stack")
    ax.set_ylabel("|with context − patched| at the query")
    ax.set_title("Per-block equivalence, 10-layer Pre-LN model")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _band(ax, x, m, se, label, color, ls="-"):
    m, se = _arr(m), _arr(se)
    ax.plot(x, m, ls, label=label, color=color)
    ax.fill_between(x, m - se, m + se, color=color, alpha=0.25)


def plot_finetune(am, ase, cm, cse, gm, gse, im, ise, lr: float, path: Path) -> None:
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    n = len(_arr(gm))
    _band(a0, np.arange(n), gm, gse, f"explicit online SGD on W (η = {lr:g})", "C0")
    _band(a0, np.arange(n), im, ise, "implicit ΔW_i: T_{W+ΔW_i}(x)", "C3")
    a0.set_yscale("log")
    a0.set_xlabel("number of context examples consumed i")
    a0.set_ylabel("query squared error (mean ± s.e.)")
    a0.set_title("Test loss: explicit fine-tuning vs implicit dynamics")
    a0.grid(alpha=0.3, which="both")
    a0.legend(fontsize=8)
    k = np.arange(1, len(_arr(am)) + 1)
    _band(a1, k, am, ase, "per step: ⟨SGD step, ΔW_i − ΔW_{i−1}⟩", "C2")
    _band(a1, k, cm, cse, "cumulative: ⟨W_i^SGD − W, ΔW_i⟩", "C4", "--")
    a1.axhline(0, color="k", lw=0.7)
    a1.set_ylim(-1, 1)
    a1.set_xlabel("step i (context example)")
    a1.set_ylabel("normalized Frobenius inner product")
    a1.set_title("Alignment of explicit and implicit updates")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    save_figure(fig, path)


def plot_convergence(curves: dict[str, tuple], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for j, (label, (m, se)) in enumerate(curves.items()):
        _band(ax, np.arange(len(m)), m, se, label, f"C{j}")
    ax.set_yscale("log")
    ax.set_xlabel("context length i")
    ax.set_ylabel("‖ΔW_{i+1} − ΔW_i‖_F (mean ± s.e.)")
    ax.set_title("Convergence of the implicit dynamics")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    save_figure(fig, path)


def plot_thought_patch(per: dict[str, dict], diff_path: Path, loss_path: Path) -> None:
    for path, (tr, te, ylabel, title) in (
            (diff_path, ("train_diff_by_K", "test_diff_by_K", "mean |T_W(C,x) − T_{W+Δ}(x)|",
                         "Static thought patch: output difference")),
            (loss_path, ("train_mse_by_K", "test_mse_by_K", "query MSE", "Static thought patch: loss"))):
        fig, axes = plt.subplots(1, len(per), figsize=(5.5 * len(per), 4), squeeze=False,
                                 layout="constrained")
        for ax, (name, r) in zip(axes[0], per.items(), strict=True):
            K = np.asarray(r["Ks"], dtype=float)
            ax.plot(K, [r[tr][str(k)] for k in r["Ks"]], "o-", label="calibration queries", color="C0")
            ax.plot(K, [r[te][str(k)] for k in r["Ks"]], "s-", label="held-out queries", color="C3")
            if tr.endswith("mse_by_K"):
                ax.axhline(r["mse_with_context"], color="k", ls="--", lw=1, label="with context (exact)")
                ax.axhline(r["mse_context_free"], color="gray", ls=":", lw=1.5, label="no context, no patch")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("number of calibration queries K")
            ax.set_ylabel(ylabel)
            ax.set_title(_TITLES.get(name, name), fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(title)
        save_figure(fig, path)
