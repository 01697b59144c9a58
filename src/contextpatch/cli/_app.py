"""The typer application shared by all command modules, and small output helpers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._io import jsonable

app = typer.Typer(
    name="contextpatch",
    help="Turn a transformer's context into exact weight patches, verify them, and study the implicit "
         "learning dynamics of in-context learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # piped or logged (no terminal): plain click help and one-line usage errors instead of rich boxes
    rich_markup_mode="rich" if sys.stderr.isatty() else None,
)

console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line in a pipe or a log


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


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print one clear error message, on one line, and exit non-zero (no traceback)."""
    # Text, not markup: a message may contain [brackets]; its own line breaks are joined into one line
    err_console.print(Text.assemble(("error:", "bold red"), " ", " ".join(msg.split())))
    raise typer.Exit(code)


@contextlib.contextmanager
def quiet_hub_loading() -> Iterator[None]:
    """Silence huggingface_hub / transformers logging (e.g. a retry line per failed request) and warnings.

    A failed load then ends in one ``error:`` line (:func:`model_load_failed`); the levels are restored after.
    """
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def model_load_failed(model: str, e: Exception) -> NoReturn:
    """One error line for a failed ``from_pretrained(model)``."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, OSError) and not os.path.isdir(os.path.expanduser(model)):
        fail(f"could not load model {model!r}: it is neither a local folder nor reachable on the Hub ({first})")
    fail(f"could not load model {model!r}: {first}")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"contextpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """contextpatch: exact context-to-weight patches (Dherin et al. 2025 and follow-ups)."""
