"""The training configuration of a zoo model (shared by training, evaluation and the registry of recipes)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

__all__ = ["ZOO_FORMAT", "TrainConfig"]

ZOO_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a training run (recorded in ``zoo.json`` and in checkpoints)."""

    name: str = "icl-llama"
    arch: str = "llama"
    width: int | None = None  # None: the architecture's default (models.py)
    layers: int | None = None
    heads: int | None = None
    mlp: int | None = None  # MLP hidden size (None: Llama 2·width, GPT-2 4·width)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # "copy" is the training-only induction warm-up (tasks.CopyTask); without it facts stalls (docs/zoo.md)
    mix: tuple[tuple[str, float], ...] = (("function", 0.3), ("facts", 0.25), ("copy", 0.15), ("instruction", 0.3))
    max_shots: int = 32
    curriculum_start: int = 2  # max shots at step 0 (ramps to max_shots)
    curriculum_frac: float = 0.5  # fraction of the steps the ramp takes (0 = no curriculum)
    queries: int = 8  # queries per training sequence (facts: at most one per fact)
    demo_targets: bool = True
    function_p: int = 11
    function_slopes: tuple[int, ...] = (1,)
    function_noise: float = 0.1
    # GPT-2 only: "normal" (HF's N(0, 0.02) learned positions) or "sinusoid" (the learned positions start from the
    # sinusoids of Vaswani et al. 2017, scaled to the token embeddings' row norm; models.sinusoid_positions)
    position_init: str = "normal"
    probe: bool = False  # a short probe run, not the full recipe
    stop_at: int | None = None  # end the run at this step (the schedule still spans ``steps``); None: ``steps``
    init_from: str | None = None  # a zoo model folder whose weights start this run (a second training phase)
    # a zoo model folder to distil from (zoo/teacher.py): attention transfer (weight attn_weight) and next-token
    # KL on every real token (weight logit_weight), added to the answer loss; same layers and heads as the student
    teacher: str | None = None
    attn_weight: float = 1.0
    logit_weight: float = 1.0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def with_overrides(self, items: list[str]) -> TrainConfig:
        """``["lr=1e-3", "mix=facts:0.5,copy:0.5", "init_from=runs/zoo/x"]`` applied to a copy (CLI ``--set``)."""
        from dataclasses import replace

        from .._errors import ContextPatchError

        known = {f.name: f for f in fields(self)}
        changes: dict = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in known or key == "name":
                raise ContextPatchError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                                        f"{', '.join(k for k in known if k != 'name')}")
            old = getattr(self, key)
            try:
                if key == "mix":
                    value = tuple((f.strip(), float(w)) for f, w in (p.split(":") for p in raw.split(",")))
                elif key == "function_slopes":
                    value = tuple(int(a) for a in raw.split(","))
                elif isinstance(old, bool):
                    value = raw.strip().lower() in ("1", "true", "yes")
                elif key in ("width", "layers", "heads", "mlp", "stop_at", "init_from", "teacher"):
                    value = (None if raw.strip().lower() in ("", "none")
                             else raw if key in ("init_from", "teacher") else int(raw))
                else:
                    value = type(old)(raw)
            except ValueError as e:
                raise ContextPatchError(f"--set {item!r}: {e}") from None
            changes[key] = value
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "mix" in d:
            d["mix"] = tuple((str(f), float(w)) for f, w in d["mix"])
        if "function_slopes" in d:
            d["function_slopes"] = tuple(int(a) for a in d["function_slopes"])
        return cls(**d)
