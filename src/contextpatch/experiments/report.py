"""Small report helpers (number formatting); file output lives in :mod:`contextpatch._io`."""

from __future__ import annotations

import math

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_out_dir, jsonable, save_figure

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_figure", "fmt", "ensure_out_dir",
           "jsonable"]


def fmt(x: float, digits: int = 3) -> str:
    """Short number format for reports: scientific below 1e-3 or above 1e4."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if ax >= 1 else f"{x:.{digits}f}"
