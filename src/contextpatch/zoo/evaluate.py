"""Exact-answer accuracy of a zoo model, with and without the context, per family and number of shots.

Greedy decoding of an answer ``a_1..a_m`` reproduces it exactly iff every teacher-forced argmax is right:
``argmax p(· | prefix, a_<j) = a_j`` for all ``j`` (if the first ``j-1`` greedy tokens equal the answer, the
``j``-th greedy step sees exactly the teacher-forced prefix). So one forward pass per sequence scores greedy
exact match. Each evaluation sequence has one query; ``k`` shots = demonstrations (function, instruction) or
facts (facts). "Without context" drops the context and keeps ``<bos> QUERY``.

Result: ``{"model": NAME, "families": {FAMILY: {"with_context", "without_context", "chance", "by_shots": {k:
acc}}}}``. ``with_context`` averages ``by_shots`` over ``k ≥ 16`` for function (the headline the recipe
targets) and over all ``k`` for facts and instruction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._errors import ContextPatchError
from .data import collate, encode_example, tasks_for
from .tasks import FAMILIES

__all__ = ["SHOTS", "evaluate_model", "evaluate", "load_zoo_model", "plot", "plot_training"]

SHOTS = {"function": (0, 1, 2, 4, 8, 16, 32), "facts": (1, 2, 4, 8, 16, 32), "instruction": (0, 1, 2, 4, 8)}
_HEADLINE_MIN_SHOTS = {"function": 16, "facts": 0, "instruction": 0}


@torch.no_grad()
def _accuracy(model, examples, *, with_context: bool, batch: int = 64) -> float:
    hits = []
    for i in range(0, len(examples), batch):
        ids, w = collate([encode_example(ex, with_context=with_context, demo_targets=False)
                          for ex in examples[i: i + batch]])
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        tgt, mask = ids[:, 1:], w[:, 1:] > 0
        hits += ((pred == tgt) | ~mask).all(dim=1).tolist()
    return float(np.mean(hits))


def evaluate_model(model, *, name: str, n: int = 50, seed: int = 1234, config=None) -> dict:
    """Accuracies of ``model`` on ``n`` fresh examples per (family, shots) point (seeded by ``seed``)."""
    from .config import TrainConfig

    tasks = tasks_for(config or TrainConfig())
    was_training = model.training
    model.eval()
    fams = {}
    for fi, fam in enumerate(FAMILIES):
        by_shots, pool = {}, []
        for k in SHOTS[fam]:
            rng = np.random.default_rng([seed, fi, k])
            exs = [tasks[fam].sample(rng, k, n_queries=1) for _ in range(n)]
            by_shots[k] = _accuracy(model, exs, with_context=True)
            pool += exs
        head = [a for k, a in by_shots.items() if k >= _HEADLINE_MIN_SHOTS[fam]]
        fams[fam] = {"with_context": float(np.mean(head)),
                     "without_context": _accuracy(model, pool[::max(1, len(pool) // (2 * n))],
                                                  with_context=False),
                     "chance": tasks[fam].chance(), "by_shots": by_shots}
    model.train(was_training)
    return {"model": name, "families": fams}


def load_zoo_model(name_or_dir: str | Path):
    """(model, zoo.json dict) of a shipped zoo name or a zoo model folder; clear error otherwise."""
    from .registry import list_models, path
    from .tasks import vocabulary

    if str(name_or_dir) in list_models():
        folder = path(str(name_or_dir))
    else:
        folder = Path(name_or_dir).expanduser()
        if not folder.is_dir():
            raise ContextPatchError(f"{name_or_dir!r} is neither a zoo model ({', '.join(list_models())}) nor "
                                    f"a folder")
    zj = folder / "zoo.json"
    if not zj.is_file():
        raise ContextPatchError(f"{folder} is not a zoo model: it has no zoo.json (train one with "
                                f"`contextpatch zoo train`)")
    meta = json.loads(zj.read_text())
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        raise ContextPatchError(f"could not load the zoo model in {folder}: {str(e).splitlines()[0]}") from e
    vocab = tok.get_vocab()
    if vocab != {w: i for i, w in enumerate(vocabulary())} or model.config.vocab_size != len(vocabulary()):
        raise ContextPatchError(f"{folder} is not a zoo model: its tokenizer/vocabulary differs from the zoo's "
                                f"{len(vocabulary())}-word vocabulary")
    return model.eval(), meta


def evaluate(name_or_dir: str | Path, *, n: int = 50, seed: int = 1234, out: Path | str | None = None) -> dict:
    """Load and evaluate; with ``out`` also write ``eval.json`` and ``accuracy.png`` there."""
    from .._io import atomic_write_json, ensure_out_dir
    from .config import TrainConfig

    model, meta = load_zoo_model(name_or_dir)
    cfg = TrainConfig.from_dict(meta.get("config", {}))
    res = evaluate_model(model, name=meta.get("name", str(name_or_dir)), n=n, seed=seed, config=cfg)
    if out is not None:
        out = ensure_out_dir(out)
        atomic_write_json(out / "eval.json", res)
        plot(res, out / "accuracy.png")
    return res


def plot(result: dict, path: Path | str) -> None:
    """Accuracy vs number of shots, one panel per family (chance and no-context as dashed lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import save_figure

    fams = result["families"]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.4), squeeze=False)
    for ax, (fam, r) in zip(axes[0], fams.items(), strict=True):
        ks = [int(k) for k in r["by_shots"]]
        ax.plot(ks, list(r["by_shots"].values()), "o-", label="with context")
        ax.axhline(r["without_context"], color="tab:red", ls="--", label="without context")
        ax.axhline(r["chance"], color="gray", ls=":", label="chance")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, max(ks) * 1.25 + 0.5)   # no negative shot ticks from the automatic margin
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("shots k (demonstrations / facts in the context)")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_title(f"{result['model']}: {fam}")
    axes[0][0].legend(loc="best", fontsize=8)
    save_figure(fig, path)


def training_curve(phases: list[dict]) -> tuple[list[int], list[float], list[int]]:
    """(steps, losses, phase starts) of consecutive training phases (their zoo.json dicts, first phase first):
    phase j's steps are offset by the ``steps_done`` of the phases before it."""
    steps, losses, starts, offset = [], [], [], 0
    for meta in phases:
        starts.append(offset)
        for s, loss, *_ in meta.get("loss_history", []):
            steps.append(offset + int(s))
            losses.append(float(loss))
        offset += int(meta.get("steps_done", meta.get("steps", 0)))
    return steps, losses, starts


def plot_training(runs: dict[str, list[dict]], path: Path | str, *, smooth: int = 20) -> None:
    """Training loss (answer tokens, moving average over ``smooth`` logged points) vs step, one line per run; a
    run is a list of consecutive phases (zoo.json dicts); a dotted line marks where a later phase starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .._io import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, phases in runs.items():
        steps, losses, starts = training_curve(phases)
        if not steps:
            continue
        k = max(1, min(smooth, len(losses)))
        avg = np.convolve(losses, np.ones(k) / k, mode="valid")
        line, = ax.plot(steps[k - 1:], avg, label=label)
        for s in starts[1:]:
            ax.axvline(s, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("training step (batch 16)")
    ax.set_ylabel(f"answer-token loss (moving average of {smooth} × 10 steps)")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)

