"""``contextpatch study``: the paper's experiments on a zoo language model (exactness, implicit dynamics,
thought patches, fine-tuning comparison)."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import ContextPatchError
from ._app import app, console, fail, print_json, print_table


@app.command("study")
def study_cmd(
    model: str = typer.Option("icl-llama", help="A shipped zoo model name (see `zoo list`) or a zoo model folder."),
    out: Path = typer.Option(None, help="Output folder (default runs/study/MODEL)."),
    preset: str = typer.Option("full", help="full: the measurement (a few minutes on 2 cores); quick: a smoke "
                                            "run in seconds (CI)."),
    seed: int = typer.Option(0, help="Seed of every prompt draw (recorded in metrics.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr)."),
    json_out: bool = typer.Option(False, "--json", help="Print the headline numbers as one JSON object."),
) -> None:
    """Exact patches, implicit dynamics over shots, thought patches vs K and online SGD vs the implicit
    increments, on a zoo LM: writes metrics.json, figures and report.md."""
    from ..study.run import headline, run_study

    out = out or Path("runs/study") / Path(model).name
    try:
        metrics = run_study(model, out, preset=preset, seed=seed, progress=progress)
    except ContextPatchError as e:
        fail(str(e))
    h = headline(metrics)
    if json_out:
        print_json({**h, "out": str(out)})
        return
    print_table("study headline", ["metric", "value"], [[k, v] for k, v in h.items()])
    console.print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and figures into {out}")
