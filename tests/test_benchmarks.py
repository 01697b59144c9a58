"""The benchmarks run (a smoke test on a tiny model: ratios are printed, never asserted as timings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_smoke():
    res = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--threads", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    for target in ("1. time extract", "2a. peak memory", "2b. dense", "3. time shared", "4a. speed-up",
                   "4b. max abs diff"):
        assert target in out
    assert "every benchmark ran" in out


def test_readme_tables_are_generated_sections():
    text = (ROOT / "README.md").read_text()
    for name in ("parity", "benchmarks"):
        start, end = text.index(f"<!-- {name}:start -->"), text.index(f"<!-- {name}:end -->")
        assert "| yes |" in text[start:end], f"README {name} table is empty: run make parity / make bench"
