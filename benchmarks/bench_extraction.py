"""Extraction benchmarks 1 and 2 (docs/engine.md): extraction overhead, peak memory, factored storage, captured vectors.

Workload: GPT-2-small-sized random model (12 layers, d = 768), float32, CPU; 512 context tokens followed by
32 query tokens; all-layer patches for the 32 query tokens.

    time(extract) / time(plain with-context forward + plain context-free forward)       bar ≤ 1.25
    peak memory(extract) / peak memory(the two plain forwards)                          bar ≤ 1.3
    bytes of the dense ΔW matrices / bytes of the stored factors                        bar ≥ 100
    bytes of a full hidden-state cache / bytes captured by the capture pass             (reported)

The plain forwards compute logits only where they are needed (the 32 query tokens), like the extraction.
Timings are steady state: the per-model weight norms stored in the patch metadata are computed by the first
extraction of a model (≈ 0.3 s here) and cached; the warm-up run absorbs that.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import best_time, gpt2_model, ids, peak_memory, report, run_script, safe_ratio

from contextpatch import extract, verify
from contextpatch.engine import capture_targets, make_layout, weight_fingerprint


def sizes(quick: bool) -> tuple[int, int]:
    return (64, 8) if quick else (512, 32)


def _inputs(quick: bool):
    model = gpt2_model(quick=quick)
    n, t = sizes(quick)
    full = ids(n + t, model.config.vocab_size, seed=1)[None]
    return model, full, n, t


def setup_plain(quick: bool):
    model, full, n, t = _inputs(quick)
    query, pos = full[:, n:], torch.arange(n, n + t)[None]

    def run():
        model(full, use_cache=False, logits_to_keep=t)
        model(query, position_ids=pos, attention_mask=torch.ones_like(query), use_cache=False)
    return run


def setup_extract(quick: bool):
    model, full, n, _ = _inputs(quick)
    return lambda: extract(model, full, context=n)


def main(quick: bool = False, out: Path | None = None) -> list[dict]:
    model, full, n, t = _inputs(quick)
    plain, ext = setup_plain(quick), setup_extract(quick)
    t_plain = best_time(plain)
    t_ext = best_time(ext)
    m_plain = peak_memory("bench_extraction:setup_plain", quick=quick)
    m_ext = peak_memory("bench_extraction:setup_extract", quick=quick)
    P = ext()
    factor_bytes = P.nbytes()                     # the input patches' shared right factor is counted once
    dense_bytes = 0
    for i in range(P.num_layers):
        for patch in P.layer_patches(i).values():
            dense_bytes += patch.dense_nbytes() if hasattr(patch, "dense_nbytes") else \
                patch.delta.numel() * patch.delta.element_size()
    layout = make_layout(full, n)
    with torch.no_grad():
        cap = capture_targets(model, full, layout.index, need_output=False)
    captured = sum(x.numel() * x.element_size() for x in cap.targets.z + cap.targets.r)
    cache = (model.config.n_layer + 1) * full.shape[1] * model.config.n_embd * 4   # output_hidden_states
    v = verify(model, full, context=n)
    mem_ratio = safe_ratio(m_ext, m_plain)    # None when the plain forwards did not grow the resident set
    rows = [
        {"target": f"1. time extract / time 2 plain forwards ({n} ctx, {t} query)",
         "measured": f"{t_ext / t_plain:.3f}", "bar": "≤ 1.25", "met": t_ext / t_plain <= 1.25,
         "detail": {"extract_s": round(t_ext, 3), "plain_forwards_s": round(t_plain, 3)}},
        {"target": "2a. peak memory extract / 2 plain forwards",
         "measured": "n/a" if mem_ratio is None else f"{mem_ratio:.3f}", "bar": "≤ 1.3",
         "met": mem_ratio is not None and mem_ratio <= 1.3, "detail": {"extract_MiB": round(m_ext / 2**20, 1),
                                                    "plain_MiB": round(m_plain / 2**20, 1)}},
        {"target": "2b. dense ΔW bytes / stored factor bytes", "measured": f"{dense_bytes / factor_bytes:.0f}x",
         "bar": "≥ 100x", "met": dense_bytes / factor_bytes >= 100,
         "detail": {"factors_MiB": round(factor_bytes / 2**20, 2), "dense_MiB": round(dense_bytes / 2**20, 1)}},
        {"target": "2c. full hidden-state cache / captured vectors", "measured": f"{cache / captured:.1f}x",
         "bar": "(info)", "met": True,
         "detail": {"captured_MiB": round(captured / 2**20, 2), "cache_MiB": round(cache / 2**20, 1),
                    "patched_vs_with_context_max_abs_logit_diff": f"{v.max_abs_diff:.2e}",
                    "unpatched_control": f"{v.control_max_abs_diff:.2e}"}},
    ]
    t_fp = best_time(lambda: weight_fingerprint(model))
    rows.append({"target": "2d. weight fingerprint (every parameter) / one extraction",
                 "measured": f"{t_fp / t_ext:.3f}",
                 "bar": "≤ 0.05", "met": t_fp / t_ext <= 0.05,
                 "detail": {"fingerprint_s": round(t_fp, 3), "extract_s": round(t_ext, 3),
                            "note": "included in every extraction (metadata) and every apply/check"}})
    report("extraction", rows, out, quick)
    return rows


if __name__ == "__main__":
    run_script(main, __doc__)
