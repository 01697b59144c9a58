"""Write generated tables into README.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers."""

from __future__ import annotations

from pathlib import Path

from contextpatch._io import atomic_write_text as write_atomic

README = Path(__file__).resolve().parents[1] / "README.md"


def update_section(name: str, body: str, readme: Path = README) -> None:
    """Replace the text between the markers of section ``name`` (the markers must exist)."""
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"README.md has no '{start}' … '{end}' section")
    write_atomic(readme, text[:i + len(start)] + "\n" + body.strip() + "\n" + text[j:])
