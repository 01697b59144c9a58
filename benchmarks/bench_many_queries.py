"""Shared-context benchmark 3 (docs/engine.md): many queries against one context share a single context pass.

Workload: the GPT-2-small-sized random model, float32, CPU; one context of 512 tokens and Q = 64 queries of
8 tokens each. ``extract_many`` packs the queries over ONE context pass (4-D mask = the context's KV cache
reused) and runs one batched patched pass; the reference runs 64 separate ``extract`` calls.

    time(extract_many) / time(64 separate extractions)        bar ≤ 0.2
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import best_time, gpt2_model, ids, report, run_script

from contextpatch import extract
from contextpatch.engine import extract_many


def main(quick: bool = False, out: Path | None = None) -> list[dict]:
    model = gpt2_model(quick=quick)
    n, Q, T = (64, 8, 4) if quick else (512, 64, 8)
    V = model.config.vocab_size
    ctx = ids(n, V, seed=2)
    queries = torch.stack([ids(T, V, seed=100 + q) for q in range(Q)])
    chunk = 16
    t_shared = best_time(lambda: extract_many(model, ctx, queries, chunk_size=chunk), repeat=2)
    with torch.no_grad():
        t0 = time.perf_counter()
        separate = [extract(model, torch.cat([ctx, queries[q]]), context=n) for q in range(Q)]
        t_sep = time.perf_counter() - t0
    shared = extract_many(model, ctx, queries, chunk_size=chunk)
    diff = max(float((shared.layers[l].inputs["mlp.c_fc"].U[q] - separate[q].layers[l].inputs["mlp.c_fc"].U[0])
                     .abs().max()) for q in range(Q) for l in range(len(shared.layers)))
    ratio = t_shared / t_sep
    rows = [{"target": f"3. time shared / {Q} separate extractions ({n} ctx, {Q}x{T} query)",
             "measured": f"{ratio:.3f}", "bar": "≤ 0.2", "met": ratio <= 0.2,
             "detail": {"shared_s": round(t_shared, 3), "separate_s": round(t_sep, 3),
                        "speed-up": f"{1 / ratio:.1f}x", "queries_per_context_pass": chunk,
                        "max |ΔU| shared vs separate (float32)": f"{diff:.2e}"}}]
    report("many queries, one context", rows, out, quick)
    return rows


if __name__ == "__main__":
    run_script(main, __doc__)
