"""The three models of the experiments, and their checkpoints (safetensors weights + JSON sidecar).

Every model is ``tokens (…, n, d+1) → embed → blocks → readout → (…, n, d+1)``; the prediction is the last
coordinate at the query (last) position. ``embed`` and ``readout`` act token by token, so the query's input
to every block is the same with and without the context, and Theorem 2.3 / C.2 patch exactly the first MLP
matrix W of each block (``blocks.extract_patches``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .._errors import ContextPatchError
from ..blocks import MLP, BlockPatches, ContextualBlock, PreLNStack, SimpleRNN, SoftmaxAttention, extract_patches
from .config import ModelConfig, TaskConfig, TrainConfig, from_dict
from .report import atomic_write_bytes, atomic_write_json

__all__ = ["ICLModel", "build_model", "save_checkpoint", "load_checkpoint", "shipped_checkpoint", "Checkpoint"]


class ICLModel(nn.Module):
    """embed (Linear d+1 → d_model) → blocks → readout; see the module docstring."""

    def __init__(self, cfg: ModelConfig, task: TaskConfig):
        super().__init__()
        d_tok = task.d + 1
        self.cfg, self.task = cfg, task
        self.embed = nn.Linear(d_tok, cfg.d_model)
        if cfg.kind == "single":
            layer = SoftmaxAttention(d_model=cfg.d_model, n_heads=cfg.n_heads, causal=True)
            self.blocks = nn.ModuleList([ContextualBlock(
                layer=layer, mlp=MLP(d_in=cfg.d_model, d_hidden=cfg.d_hidden, d_out=d_tok, depth=cfg.mlp_depth))])
            self.readout: nn.Module = nn.Identity()
        elif cfg.kind == "rnn":
            self.blocks = nn.ModuleList([ContextualBlock(
                layer=SimpleRNN(d_model=cfg.d_model),
                mlp=MLP(d_in=cfg.d_model, d_hidden=cfg.d_hidden, d_out=d_tok, depth=cfg.mlp_depth))])
            self.readout = nn.Identity()
        elif cfg.kind == "deep":
            stack = PreLNStack(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                               d_hidden=cfg.d_hidden, layer="softmax", causal=True, layer_norm=True,
                               mlp_depth=cfg.mlp_depth)
            self.blocks = stack.blocks
            self.readout = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, d_tok))
        else:
            raise ContextPatchError(f"unknown model kind {cfg.kind!r}; choose one of: single, deep, rnn")

    # ------------------------------------------------------------------ plain passes
    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.readout(h)

    def predict(self, tokens: Tensor) -> Tensor:
        """ŷ for the query: last coordinate of the output at the last position, (…,)."""
        return self(tokens)[..., -1, -1]

    def predict_context_free(self, query: Tensor) -> Tensor:
        """ŷ = T_W(x) for query tokens (…, d+1) run alone (a one-token sequence)."""
        return self(query.unsqueeze(-2))[..., 0, -1]

    # ------------------------------------------------------------------ patches
    def query_patches(self, tokens: Tensor, *, tol: float | None = None) -> list[BlockPatches]:
        """Per-block patches that absorb the whole context C at the query (keep = query only)."""
        n = tokens.shape[-2]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[-1] = True
        return extract_patches(self.blocks, self.embed(tokens), keep, tol=tol)

    def block_outputs(self, tokens: Tensor, patches: list[BlockPatches] | None = None) -> list[Tensor]:
        """Every block's output at the last position (…, d_model), optionally with patches applied."""
        h = self.embed(tokens)
        outs = []
        for i, b in enumerate(self.blocks):
            h = b(h) if patches is None else b(h, patch=patches[i].weight, residual=patches[i].residual)
            outs.append(h[..., -1, :])
        return outs

    def patched_output(self, query: Tensor, patches: list[BlockPatches]) -> tuple[Tensor, list[Tensor]]:
        """T_{W+ΔW}(x): the context-free pass of the query with the patches; (output (…, d+1), per-block states)."""
        states = self.block_outputs(query.unsqueeze(-2), patches)
        return self.readout(states[-1]), states

    @property
    def Ws(self) -> list[Tensor]:
        return [b.mlp.W for b in self.blocks]


def build_model(cfg: ModelConfig, task: TaskConfig, seed: int = 0) -> ICLModel:
    torch.manual_seed(seed)
    return ICLModel(cfg, task)


# ------------------------------------------------------------------------------ checkpoints
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its JSON metadata (configs, history, step)."""

    def __init__(self, model: ICLModel, meta: dict[str, Any]):
        self.model, self.meta = model, meta

    @property
    def history(self) -> dict[str, list]:
        return self.meta.get("history", {})

    @property
    def train_cfg(self) -> TrainConfig:
        return from_dict(TrainConfig, self.meta.get("train", {}))


def save_checkpoint(stem: Path, model: ICLModel, *, train: TrainConfig, history: dict[str, list], step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Write ``stem.safetensors`` (weights) and ``stem.json`` (configs, history, step), atomically."""
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": 1, "model": asdict(model.cfg), "task": asdict(model.task), "train": asdict(train),
            "step": step, "history": history, **(extra or {})}
    atomic_write_bytes(stem.with_suffix(".safetensors"), st_save(sd, metadata={"format": "contextpatch-icl-1"}))
    atomic_write_json(stem.with_suffix(".json"), meta)


def load_checkpoint(stem: Path | str) -> Checkpoint:
    """Load ``stem.safetensors`` + ``stem.json`` (stem may also end in either suffix)."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    wpath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not wpath.is_file() or not jpath.is_file():
        raise ContextPatchError(f"checkpoint {stem} is incomplete: need both {wpath.name} and {jpath.name}")
    try:
        meta = json.loads(jpath.read_text())
        cfg = from_dict(ModelConfig, meta["model"])
        task = from_dict(TaskConfig, meta["task"])
        model = ICLModel(cfg, task)
        model.load_state_dict(load_file(str(wpath)))
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise ContextPatchError(f"cannot load checkpoint {stem}: {e}") from e
    model.eval()
    return Checkpoint(model, meta)


def shipped_checkpoint(name: str) -> Path:
    """Path stem of a checkpoint shipped in ``contextpatch/checkpoints`` (single, deep, rnn)."""
    root = Path(str(resources.files("contextpatch") / "checkpoints"))
    stem = root / name
    if not stem.with_suffix(".safetensors").is_file():
        raise ContextPatchError(f"no shipped checkpoint {name!r} in {root}; run `contextpatch train --model {name} "
                                f"--preset default --out {root}` to create it")
    return stem
