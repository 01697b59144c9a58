"""Configuration dataclasses and presets for the in-context linear-regression experiments.

Every number that the paper does not give (docs/theory.md §7.1: widths, optimiser, learning rates, steps,
ridge λ, fine-tuning protocol) is chosen here, in one place, and written into every metrics.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .._errors import ContextPatchError

__all__ = [
    "TaskConfig", "ModelConfig", "TrainConfig", "ExperimentConfig", "MODEL_NAMES", "PRESETS",
    "model_preset", "train_preset", "experiment_preset", "from_dict", "as_dict",
]

MODEL_NAMES = ("single", "deep", "rnn")
PRESETS = ("quick", "default", "paper")


@dataclass(frozen=True)
class TaskConfig:
    """In-context linear regression (Garg et al. 2022): w, x_i ~ N(0, I_d), y_i = ⟨w, x_i⟩, no noise."""

    d: int = 2            # input dimension; tokens (x, y) live in R^{d+1}
    n_context: int = 50   # N context examples before the query


@dataclass(frozen=True)
class ModelConfig:
    """One of the three models. Tokens (d+1) -> embed (linear, per token) -> blocks -> readout -> (d+1).

    kind: ``single`` (one contextual block, softmax attention + MLP, no LN, no skip),
    ``deep`` (Pre-LN stack with residuals), ``rnn`` (one contextual block with an Elman RNN as the layer).
    The per-token embedding is part of the contextual layer's input map and the readout acts per token, so
    the patched matrix is always the first MLP matrix W of each block and the theorem stays exact.
    """

    kind: str = "single"
    d_model: int = 64
    n_heads: int = 8
    d_hidden: int = 256
    n_layers: int = 1
    mlp_depth: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """Adam with linear warm-up and cosine decay; a fresh batch of tasks every step (float32)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    n_val: int = 512
    seed: int = 0
    checkpoint_every: int = 500


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes and protocol choices of the four experiments."""

    seed: int = 1234
    n_test: int = 100                 # test prompts for equivalence, fine-tuning, convergence
    n_icl: int = 2000                 # test prompts for the ICL MSE numbers
    # fine-tuning (experiment 2)
    ft_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    ft_n_select: int = 100            # separate prompts used only to pick the SGD learning rate
    # static thought patch (experiment 4)
    tp_Ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100)
    tp_n_contexts: int = 10
    tp_n_heldout: int = 100
    tp_ridge_rel: float = 1e-3        # λ = tp_ridge_rel · mean ‖a_k‖² over the calibration keys


def model_preset(name: str, preset: str) -> ModelConfig:
    _check(name, preset)
    if preset == "quick":
        return {"single": ModelConfig("single", 16, 4, 64, 1),
                "deep": ModelConfig("deep", 8, 2, 32, 10),
                "rnn": ModelConfig("rnn", 16, 1, 64, 1)}[name]
    if preset == "default":
        return {"single": ModelConfig("single", 64, 8, 256, 1),
                "deep": ModelConfig("deep", 16, 4, 64, 10),
                "rnn": ModelConfig("rnn", 32, 1, 128, 1)}[name]
    return {"single": ModelConfig("single", 128, 8, 512, 1),
            "deep": ModelConfig("deep", 32, 4, 128, 10),
            "rnn": ModelConfig("rnn", 64, 1, 256, 1)}[name]


def train_preset(name: str, preset: str) -> TrainConfig:
    _check(name, preset)
    seed = {"single": 0, "deep": 1, "rnn": 2}[name]
    if preset == "quick":
        return TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup=10, eval_every=20, n_val=64, seed=seed,
                           checkpoint_every=30)
    if preset == "default":
        steps = {"single": 3000, "deep": 800, "rnn": 1500}[name]
        return TrainConfig(steps=steps, batch_size=128 if name == "single" else 64, seed=seed,
                           lr=2e-3 if name != "deep" else 1e-3, n_val=512 if name != "deep" else 256,
                           checkpoint_every=500 if name != "deep" else 200)
    steps = {"single": 10000, "deep": 5000, "rnn": 5000}[name]
    return TrainConfig(steps=steps, batch_size=128, seed=seed, lr=1e-3, eval_every=250, n_val=1024,
                       checkpoint_every=1000)


def experiment_preset(preset: str) -> ExperimentConfig:
    if preset not in PRESETS:
        raise ContextPatchError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if preset == "quick":
        return ExperimentConfig(n_test=24, n_icl=256, ft_n_select=24, ft_lrs=(1e-2, 1e-1),
                                tp_Ks=(1, 2, 5, 10, 25, 50), tp_n_contexts=4, tp_n_heldout=50)
    return ExperimentConfig()


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass from a dict (e.g. a checkpoint's JSON), ignoring unknown keys."""
    names = {f.name for f in fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**kw)


def _check(name: str, preset: str) -> None:
    if name not in MODEL_NAMES:
        raise ContextPatchError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if preset not in PRESETS:
        raise ContextPatchError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")


def as_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)

