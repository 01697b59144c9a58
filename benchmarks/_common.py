"""Shared pieces of the benchmarks: the model of the targets, timing and peak-memory measurement.

Timings are the minimum over ``repeat`` runs after one warm-up, measured side by side in one process.
Peak memory is measured in a fresh child process per workload: the child builds the model, resets the kernel's
high-water mark (``/proc/self/clear_refs``), runs the workload, and reports VmHWM − RSS-before (the increase
of the resident set during the workload, i.e. activations and results, not the weights).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def gpt2_model(*, quick: bool, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The target's model: GPT-2-small-sized (12 layers, d = 768, 12 heads, vocab 50257), random weights, eager.

    ``quick``: a 2-layer, d = 64 stand-in for the CI smoke run.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = (GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=1000) if quick else
           GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257))
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def interleaved_best(fns: dict[str, Callable[[], object]], *, repeat: int = 3) -> dict[str, float]:
    """Minimum wall time (seconds) of each workload over ``repeat`` rounds after one warm-up each, the workloads
    alternating within a round, so that machine load drifting during the run hits every workload alike."""
    with torch.no_grad():
        for fn in fns.values():
            fn()
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(repeat):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Minimum wall time over ``repeat`` runs after one warm-up (seconds)."""
    return interleaved_best({"fn": fn}, repeat=repeat)["fn"]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(target: str, kwargs: dict, q) -> None:
    import importlib

    mod_name, fn_name = target.rsplit(":", 1)
    setup = getattr(importlib.import_module(mod_name), fn_name)
    run = setup(**kwargs)            # builds the model and inputs, returns the workload
    with torch.no_grad():
        run()                        # warm-up (allocator pools, lazy init)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
        run()
        q.put((_rss_kb("VmHWM") - before) * 1024)


def peak_memory(target: str, **kwargs) -> int:
    """Peak resident-set increase (bytes) of ``module:setup_fn(**kwargs)()`` in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, kwargs, q))
    # glibc raises its mmap threshold after large frees and then keeps freed tensors in the heap, so the
    # resident set would stop tracking live memory after the warm-up; a fixed threshold returns them to the OS.
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    try:
        p.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"memory child for {target} failed with exit code {p.exitcode}")
    return q.get()


def safe_ratio(num: float, den: float) -> float | None:
    """``num / den``, or ``None`` when ``den`` is not positive (e.g. a peak-memory increase of 0 KiB on a tiny
    smoke-run model, where the resident set did not grow after the warm-up)."""
    return num / den if den > 0 else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(name: str, rows: list[dict], out: Path | None, quick: bool = False) -> None:
    """Print ``target | measured | bar | met`` rows and optionally append them as JSON.

    ``quick`` runs are smoke tests on a tiny model: their ratios are printed but judged against no bar, except
    the rows marked ``"correctness": True`` (an accuracy, not a timing or a size-dependent ratio), judged always.
    """
    print(f"\n== {name}" + ("  (--quick smoke run: tiny model, only correctness bars judged)" if quick else ""))
    for r in rows:
        if quick and not r.get("correctness"):
            r["met"] = None
        met = "smoke" if r["met"] is None else ("MET" if r["met"] else "NOT MET")
        print(f"  {r['target']:<58} {r['measured']:>12}   bar {r['bar']:<10} {met}")
        for k, v in r.get("detail", {}).items():
            print(f"      {k}: {v}")
    if out is not None:
        data = json.loads(out.read_text()) if out.exists() else {}
        data[name] = rows
        out.write_text(json.dumps(data, indent=1))


def run_script(main: Callable[..., object], doc: str | None) -> None:
    """The command line of one benchmark script: ``--quick`` (tiny model smoke run) and ``--json FILE``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model: a smoke run, not a measurement")
    ap.add_argument("--json", type=Path, default=None, help="append results to this JSON file")
    a = ap.parse_args()
    main(a.quick, a.json)
