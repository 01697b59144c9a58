"""Command-line interface: ``contextpatch --help``. Each command module registers on the shared app."""

from . import (
    _core,  # noqa: F401  (registers verify-block)
    _dynamics,  # noqa: F401  (registers dynamics)
    _experiments,  # noqa: F401  (registers reproduce, experiment, train)
    _hf,  # noqa: F401  (registers extract, verify, generate)
    _static,  # noqa: F401  (registers compress)
    _study,  # noqa: F401  (registers study)
    _zoo,  # noqa: F401  (registers zoo list|train|eval)
)
from ._app import app

__all__ = ["app"]


def main() -> None:  # pragma: no cover
    app()
