"""``contextpatch zoo list | train | eval``: small language models that learn in context."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import ContextPatchError
from ._app import app, console, fail, print_json, print_table

zoo_app = typer.Typer(help="Small language models that learn in context (function induction, fact recall, "
                           "instructions): list, train, evaluate.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the zoo models, their architecture and whether their folder is shipped."""
    from ..zoo.registry import MODELS_DIR, RECIPES

    rows = {n: {"arch": c.arch, "shipped": (MODELS_DIR / n / "zoo.json").is_file(), "path": str(MODELS_DIR / n)}
            for n, c in sorted(RECIPES.items())}
    if json_out:
        print_json(rows)
        return
    print_table("zoo models", ["name", "arch", "shipped", "path"],
                [[n, r["arch"], r["shipped"], r["path"]] for n, r in rows.items()])


@zoo_app.command("train")
def train_cmd(
    name: str = typer.Argument(..., help="Zoo model name (see `zoo list`): picks the recipe."),
    out: Path = typer.Option(None, help="Output folder (default runs/zoo/NAME); the checkpoint goes in "
                                        "OUT/checkpoint."),
    minutes: float = typer.Option(60.0, help="Training time budget; sets the number of steps from a short "
                                             "timing of this machine (the final evaluation comes on top)."),
    steps: int = typer.Option(None, help="Use exactly this many steps instead of --minutes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint (same configuration)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe field, FIELD=VALUE (repeatable), e.g. "
                                                      "--set lr=1e-3 --set mix=facts:0.5,copy:0.5 --set "
                                                      "init_from=runs/zoo/icl-llama (start from a trained "
                                                      "model: a second phase) or --set teacher=icl-llama "
                                                      "(distil from a trained zoo model: attention transfer + "
                                                      "next-token KL). Give the same --set on --resume."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr)."),
    json_out: bool = typer.Option(False, "--json", help="Print zoo.json's summary as one JSON object."),
) -> None:
    """Train a zoo model with its full recipe on CPU (AdamW, cosine LR, answer-only loss, curriculum)."""
    import json
    from dataclasses import replace

    from ..zoo.registry import recipe
    from ..zoo.train import TrainConfig, estimate_steps, train

    out = out or Path("runs/zoo") / name
    try:
        cfg = recipe(name).with_overrides(set_ or [])
        state = out / "checkpoint" / "state.pt"
        if steps is not None:
            if steps < 1:
                raise ContextPatchError(f"--steps must be ≥ 1, got {steps}")
            cfg = replace(cfg, steps=steps)
        elif resume and state.is_file():  # keep the step count the interrupted run derived from --minutes
            import torch

            saved = TrainConfig.from_dict(torch.load(state, map_location="cpu", weights_only=False)["config"])
            cfg = replace(cfg, steps=saved.steps)
        else:
            if minutes <= 0:
                raise ContextPatchError(f"--minutes must be > 0, got {minutes}")
            cfg = replace(cfg, steps=estimate_steps(cfg, minutes))
        meta = train(cfg, out, resume=resume, progress=progress)
    except ContextPatchError as e:
        fail(str(e))
    summary = {k: meta[k] for k in ("name", "steps", "wall_seconds", "tokens_per_second")}
    summary["accuracy"] = {f: r["with_context"] for f, r in (meta["metrics"] or {"families": {}})["families"].items()}
    summary["out"] = str(out)
    if json_out:
        print_json(summary)
        return
    console.print(json.dumps(summary, indent=2))
    console.print(f"wrote the model, tokenizer, zoo.json and accuracy.png into {out}")


@zoo_app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A zoo model name (see `zoo list`) or a zoo model folder."),
    out: Path = typer.Option(None, help="Also write eval.json and accuracy.png into this folder."),
    examples: int = typer.Option(50, help="Examples per (family, shots) point."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Exact-answer accuracy with and without the context, per family and number of shots."""
    from ..zoo.evaluate import evaluate

    try:
        if examples < 1:
            raise ContextPatchError(f"--examples must be ≥ 1, got {examples}")
        res = evaluate(model, n=examples, out=out)
    except ContextPatchError as e:
        fail(str(e))
    if json_out:
        print_json(res)
        return
    print_table(f"zoo eval: {res['model']}", ["family", "with context", "without context", "chance", "by shots"],
                [[f, r["with_context"], r["without_context"], r["chance"],
                  " ".join(f"{k}:{v:.2f}" for k, v in r["by_shots"].items())] for f, r in res["families"].items()])
