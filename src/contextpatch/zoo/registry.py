"""The shipped zoo models (folders under ``contextpatch/zoo/models/``) and their training recipes."""

from __future__ import annotations

from pathlib import Path

from .._errors import ContextPatchError
from .config import TrainConfig

__all__ = ["MODELS_DIR", "RECIPES", "list_models", "path", "recipe"]

MODELS_DIR = Path(__file__).parent / "models"

#: the full recommended recipe per shipped name (``zoo train NAME --minutes M`` sets ``steps`` from M)
RECIPES = {
    "icl-llama": TrainConfig(name="icl-llama", arch="llama"),
    "icl-gpt2": TrainConfig(name="icl-gpt2", arch="gpt2"),
}


def list_models() -> list[str]:
    """The zoo model names (whether or not their folder is shipped in this install)."""
    return sorted(RECIPES)


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ContextPatchError(f"unknown zoo model {name!r}; available: {', '.join(list_models())}")
    return RECIPES[name]


def path(name: str) -> Path:
    """``MODELS_DIR/name``: a standard HF folder (config, safetensors, tokenizer, zoo.json)."""
    recipe(name)
    p = MODELS_DIR / name
    if not (p / "zoo.json").is_file():
        raise ContextPatchError(f"zoo model {name!r} is not shipped in this install (no {p}/zoo.json); train it "
                                f"with `contextpatch zoo train {name} --out {p}`")
    return p
