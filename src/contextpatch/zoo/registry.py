"""The shipped zoo models (folders under ``contextpatch/zoo/models/``) and their training recipes."""

from __future__ import annotations

from pathlib import Path

from .._errors import ContextPatchError
from .config import TrainConfig

__all__ = ["MODELS_DIR", "RECIPES", "list_models", "path", "recipe"]

MODELS_DIR = Path(__file__).parent / "models"

#: the full recommended recipe per shipped name (``zoo train NAME --minutes M`` sets ``steps`` from M)
#: Width 128, 4 layers, 4 heads, MLP 512 (Llama 1.06M, GPT-2 1.33M parameters): the 2.7M default sizes ran at
#: ~1,100 tokens/s on one core and learned too little in 40 minutes (docs/zoo.md), so the shipped recipe trades
#: width for ~3x the steps.
_SHIPPED = dict(width=128, layers=4, heads=4, mlp=512, lr=3e-3,
                mix=(("function", 0.35), ("facts", 0.2), ("copy", 0.15), ("instruction", 0.3)))
#: icl-gpt2 (shipped since 2026-11-27): GPT-2 with learned positions did not form induction heads from the task
#: loss (plateaus in mixed training; copy loss stuck at 1.4-3.8 in copy-only phases with or without sinusoid
#: positions or the lag warm-up; docs/zoo.md), so it is taught by the shipped icl-llama (zoo/teacher.py: attention
#: transfer and next-token KL, MiniLM-style; same 4 layers x 4 heads). Two phases, 43 minutes on one thread:
#:   A (the recipe): copy only, attention + logit distillation; `zoo train icl-gpt2 --steps 1500 --set stop_at=700
#:      --out A` (induction within 600 steps: 99.8 % of the unambiguous copy tokens right)
#:   B: `zoo train icl-gpt2 --steps 4000 --set stop_at=2000 --set init_from=A --set attn_weight=0
#:      --set mix=function:0.4,facts:0.2,copy:0.1,instruction:0.3 --out B`     (logit distillation + answer loss)
#:      function 0.97 at k >= 16, facts 1.00, instruction 0.97
_GPT2 = {**_SHIPPED, "lr": 2e-3, "position_init": "normal", "mix": (("copy", 1.0),), "curriculum_frac": 0.0,
         "teacher": "icl-llama", "attn_weight": 1.0, "logit_weight": 1.0}
#: icl-llama-induction: the induction mechanism first (copy task only; it forms at steps 400-700), then the
#: first icl-llama's mix. The shipped folder: `zoo train icl-llama --steps 2500 --set mix=copy:1.0 --out A`,
#: interrupted at step 1,200 (the recipe below: `zoo train icl-llama-induction --steps 2500 --set stop_at=1200
#: --out A`), then B: the first icl-llama's mix, `zoo train icl-llama --steps 2000 --set init_from=A
#: --set mix=function:0.35,facts:0.2,copy:0.15,instruction:0.3 --out B` (docs/zoo.md). Facts 1.00, instruction
#: 0.93, function 0.03.
_INDUCTION = {**_SHIPPED, "mix": (("copy", 1.0),)}
#: icl-llama (shipped since 2026-11-27; replaces a first icl-llama trained with _SHIPPED alone): four phases, the
#: first two are icl-llama-induction's (A, B above), then
#:   C: `zoo train icl-llama --steps 1500 --set init_from=B --set mix=function:1.0 --set lr=2e-3
#:      --set curriculum_frac=0.3 --out C`                     (function only: 0.30 at k >= 16, the rest forgotten)
#:   D: `zoo train icl-llama --steps 8000 --set stop_at=5000 --set init_from=C --set lr=2e-3 --set curriculum_frac=0
#:      --set mix=function:0.5,facts:0.1,copy:0.05,instruction:0.35 --out D`   (function induction clicks at
#:      ~3,500 steps)
#: The recipe below is phase A; every phase's config is recorded in zoo.json (the `parent` chain).
#: Within the 60-minute budget (measured after shipping, docs/zoo.md, not shipped): A, then
#:   `zoo train icl-llama --steps 4000 --set stop_at=1000 --set init_from=A --set lr=2e-3 --set curriculum_frac=0
#:    --set mix=function:0.4,facts:0.2,copy:0.1,instruction:0.3`     (1,270 s in all: function 0.96, facts 0.99,
#:    instruction 0.95)
RECIPES = {
    "icl-llama": TrainConfig(name="icl-llama", arch="llama", **_INDUCTION),
    "icl-llama-induction": TrainConfig(name="icl-llama-induction", arch="llama", **_INDUCTION),
    "icl-gpt2": TrainConfig(name="icl-gpt2", arch="gpt2", **_GPT2),
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
