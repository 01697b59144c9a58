"""Shared-context benchmark 4 (docs/engine.md): implicit dynamics over every prefix, batched over the shared context.

Workload: the GPT-2-small-sized random model, float32, CPU; a context of n = 256 tokens and a 1-token query;
the patches of every prefix c_1..c_i (i = 1..n), all layers. ``prefix_dynamics`` runs ONE packed context pass
(row i masked to its prefix) and one batched patched pass of n rows; the reference runs n separate extractions
on the prompts [c_1..c_i, x].

    time(n naive extractions) / time(batched)           bar ≥ 20
    max |Δ| of the per-layer ‖ΔW_i‖, ‖ΔW_{i+1} − ΔW_i‖   bar ≤ 1e-4 (float32)
"""

from __future__ import annotations

import time
from pathlib import Path

from _common import best_time, gpt2_model, ids, report, run_script

from contextpatch.engine import dynamics_from_patches, extract_prefixes_naive, prefix_dynamics


def main(quick: bool = False, out: Path | None = None) -> list[dict]:
    model = gpt2_model(quick=quick)
    n = 32 if quick else 256
    V = model.config.vocab_size
    ctx, q = ids(n, V, seed=3), ids(1, V, seed=4)
    chunk = None  # all n prefix rows in ONE packed pass (packed length 2n)
    t_fast = best_time(lambda: prefix_dynamics(model, ctx, q, chunk_size=chunk), repeat=2)
    fast = prefix_dynamics(model, ctx, q, chunk_size=chunk)
    t0 = time.perf_counter()
    slow = dynamics_from_patches(extract_prefixes_naive(model, ctx, q))
    t_slow = time.perf_counter() - t0
    diff = max(float((fast.step_norms - slow.step_norms).abs().max()),
               float((fast.patch_norms - slow.patch_norms).abs().max()))
    speed = t_slow / t_fast
    rows = [
        {"target": f"4a. speed-up batched prefix dynamics vs {n} passes", "measured": f"{speed:.1f}x",
         "bar": "≥ 20x", "met": speed >= 20,
         "detail": {"batched_s": round(t_fast, 3), "naive_s": round(t_slow, 3),
                    "prefix_rows_per_pass": n if chunk is None else chunk}},
        {"target": "4b. max abs diff of dynamics norms, batched vs naive", "measured": f"{diff:.2e}", "bar": "≤ 1e-4",
         "met": diff <= 1e-4, "correctness": True,
         "detail": {"largest step norm": f"{float(slow.step_norms.max()):.3e}"}},
    ]
    report("prefix dynamics", rows, out, quick)
    return rows


if __name__ == "__main__":
    run_script(main, __doc__)
