"""Run every benchmark (docs/engine.md) side by side and print (and save) the table of measured ratios.

    python benchmarks/run_all.py            # the real targets (GPT-2-small-sized model; a few minutes on 2 cores)
    python benchmarks/run_all.py --quick    # tiny model: a CI smoke run of the same code paths; only the
                                            # correctness rows (4b) are judged, timings and ratios are not

Writes ``benchmarks/results.json``, ``benchmarks/results.md`` and the README's benchmark table unless ``--quick``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_compressed_inference  # noqa: E402
import bench_extraction  # noqa: E402
import bench_many_queries  # noqa: E402
import bench_prefix_dynamics  # noqa: E402
from _common import git_rev, machine  # noqa: E402
from _readme import update_section, write_atomic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model smoke run (CI): only correctness bars judged")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    ap.add_argument("--render", action="store_true",
                    help="only rebuild results.md and the README table from results.json (no measuring)")
    a = ap.parse_args()
    if a.render:
        data = json.loads((HERE / "results.json").read_text())
        render(data)
        return 0
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}; commit {git_rev()}")
    rows = []
    for mod in (bench_extraction, bench_many_queries, bench_prefix_dynamics, bench_compressed_inference):
        rows += mod.main(quick=a.quick)
    if a.quick:
        print("\nquick smoke run finished: every benchmark ran (ratios on a tiny model are not measurements)")
        failed = [r["target"] for r in rows if r.get("correctness") and not r["met"]]
        for target in failed:
            print(f"correctness row NOT MET: {target}")
        return 1 if failed else 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    data = {"machine": machine(), "commit": git_rev(), "date": stamp, "rows": rows}
    write_atomic(HERE / "results.json", json.dumps(data, indent=1))
    render(data)
    return 0 if all(r["met"] for r in rows) else 1


def render(data: dict) -> None:
    """results.json -> results.md and the README's benchmark table (cells escaped for markdown)."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|")

    lines = [f"Measured {data['date']} on {data['machine']}, commit {data['commit']} (`make bench`).", "",
             "| target | measured | bar | met |", "|---|---|---|---|"]
    lines += [f"| {cell(r['target'])} | {cell(r['measured'])} | {cell(r['bar'])} | {'yes' if r['met'] else 'NO'} |"
              for r in data["rows"]]
    write_atomic(HERE / "results.md", "\n".join(lines) + "\n")
    update_section("benchmarks", "\n".join(lines))
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
