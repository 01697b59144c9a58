"""``contextpatch reproduce | experiment … | train``: the paper's in-context linear-regression experiments."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import ContextPatchError
from ._app import app, console, fail, print_json, print_table

experiment_app = typer.Typer(help="Run one experiment of the paper on the shipped (or given) checkpoints; each "
                                  "writes metrics.json, PNG figures and report.md into --out.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

_PRESET_HELP = ("default: the shipped checkpoints; quick: tiny models trained in seconds (CI); paper: retrain "
                "the full-size models first (minutes to tens of minutes on CPU).")


def _headline_rows(metrics: dict) -> list[list]:
    from ..experiments.run import flatten_metrics, headline

    return [[k, v] for k, v in flatten_metrics(headline(metrics)).items()]


def _finish(metrics: dict, out: Path, json_out: bool) -> None:
    from ..experiments.run import headline

    if json_out:
        print_json({**headline(metrics), "out": str(out)})
        return
    print_table("headline metrics", ["metric", "value"], _headline_rows(metrics))
    console.print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and figures into {out}")


@app.command("reproduce")
def reproduce_cmd(
    preset: str = typer.Option("default", help=_PRESET_HELP),
    out: Path = typer.Option(Path("runs/reproduce"), help="Output folder (created if needed)."),
    checkpoints: Path = typer.Option(None, help="Folder with single/deep/rnn .safetensors+.json to use instead."),
    resume: bool = typer.Option(False, "--resume", help="quick/paper: resume interrupted training in OUT/checkpoints."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on stderr)."),
    json_out: bool = typer.Option(False, "--json", help="Print the headline metrics as one JSON object."),
) -> None:
    """Run all four experiments (equivalence, fine-tuning, convergence, thought patch) and write a report."""
    _run(preset, out, checkpoints, progress, json_out, resume=resume)


def _run(preset: str, out: Path, checkpoints: Path | None, progress: bool, json_out: bool, **kwargs) -> None:
    from ..experiments.run import reproduce

    try:
        metrics = reproduce(preset, out, checkpoints=checkpoints, progress=progress, **kwargs)
    except ContextPatchError as e:
        fail(str(e))
    _finish(metrics, out, json_out)


_OUT = typer.Option(None, help="Output folder (default runs/<experiment>).")
_CK = typer.Option(None, help="Folder with single/deep/rnn .safetensors+.json to use instead of the preset's.")
_PROG = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on stderr).")
_JSON = typer.Option(False, "--json", help="Print the headline metrics as one JSON object.")
_PRESET = typer.Option("default", help=_PRESET_HELP)


_EXPERIMENTS = {
    "equivalence": "|T_W(C,x) − T_{W+ΔW}(x)| over 100 prompts, float32 and float64, per block; training curves.",
    "finetune": "Online SGD on W over the context examples against the implicit updates ΔW_{i+1} − ΔW_i.",
    "convergence": "‖ΔW_{i+1} − ΔW_i‖ against context length: softmax attention vs RNN.",
    "thought-patch": "Static (query-independent) patches fitted by ridge least squares on K queries, tested "
                     "without context.",
}


def _experiment_command(name: str, doc: str) -> None:
    def cmd(preset: str = _PRESET, out: Path = _OUT, checkpoints: Path = _CK, progress: bool = _PROG,
            json_out: bool = _JSON) -> None:
        _run(preset, out or Path(f"runs/{name}"), checkpoints, progress, json_out, experiments=[name])

    cmd.__doc__ = doc
    experiment_app.command(name)(cmd)


for _name, _doc in _EXPERIMENTS.items():
    _experiment_command(_name, _doc)


@app.command("train")
def train_cmd(
    model: str = typer.Option("single", help="single, deep, rnn or all."),
    preset: str = typer.Option("default", help="quick, default (the shipped checkpoints) or paper."),
    out: Path = typer.Option(Path("runs/train"), help="Folder for MODEL.safetensors, MODEL.json and the "
                                                      "resumable MODEL.state.pt."),
    steps: int = typer.Option(None, help="Override the preset's number of training steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/MODEL.state.pt (same configuration)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final losses as one JSON object."),
) -> None:
    """Train a model on in-context linear regression (Adam, float32), with resumable checkpoints."""
    from dataclasses import replace

    from ..experiments.config import MODEL_NAMES, TaskConfig, model_preset, train_preset
    from ..experiments.report import ensure_out_dir
    from ..experiments.train import train_model

    names = list(MODEL_NAMES) if model == "all" else [model]
    results = {}
    try:
        for n in names:
            mc, tc = model_preset(n, preset), train_preset(n, preset)
            if steps is not None:
                if steps < 1:
                    raise ContextPatchError(f"--steps must be ≥ 1, got {steps}")
                tc = replace(tc, steps=steps)
            ensure_out_dir(out)
            ck = train_model(n, mc, TaskConfig(), tc, out, resume=resume, progress=progress, preset=preset)
            h = ck.history
            results[n] = {"steps": ck.meta["step"], "train_loss": h["train_loss"][-1], "val_loss": h["val_loss"][-1],
                          "val_loss_patched": h["val_loss_patched"][-1], "checkpoint": str(out / n),
                          "train_wall_s": ck.meta.get("train_wall_s")}
    except ContextPatchError as e:
        fail(str(e))
    if json_out:
        print_json(results)
        return
    print_table("training", ["model", "steps", "train loss", "val loss", "val loss via ΔW", "checkpoint"],
                [[n, r["steps"], r["train_loss"], r["val_loss"], r["val_loss_patched"], r["checkpoint"]]
                 for n, r in results.items()])
