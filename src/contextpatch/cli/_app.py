"""The typer application shared by all command modules, and small output helpers."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .._io import jsonable

app = typer.Typer(
    name="contextpatch",
    help="Turn a transformer's context into exact weight patches, verify them, and study the implicit "
         "learning dynamics of in-context learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=False)
err_console = Console(stderr=True)


def print_json(obj: dict) -> None:
    """Print one JSON object on stdout (machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a rich table; floats in scientific notation."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.3e}" if isinstance(v, float) else str(v) for v in r])
    console.print(t)


def fail(msg: str, code: int = 2) -> None:
    """Print one clear error message and exit non-zero (no traceback)."""
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"contextpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """contextpatch: exact context-to-weight patches (Dherin et al. 2025 and follow-ups)."""
