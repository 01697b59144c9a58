"""A fixed context compressed into an adapter, on the zoo language models: static (closed form) vs LoRA context
distillation vs the hybrid, side by side (issue 10 §1–§2; docs/adapters.md).

    python benchmarks/adapters_zoo.py [--model icl-llama --model icl-gpt2] [--steps 150] [--seed 0]
                                      [--out runs/adapters_zoo] [--figure FILE] [--threads N] [--quick]

For every model and fixed context (3 function rules shown by 16 demonstrations, fact sheets of 8/16/32 facts,
3 instructions; ``contextpatch.study.adapters``), with the same calibration and held-out queries: the with-context
model, the no-context control, static adapters (``fit_static``; ranks 1/4/16/full; drop-in ``<bos> QUERY`` at
positions 0.. and at the fitted positions; the extensions: ridge chosen on the calibration set, the
attention-output slot, reduced-rank truncation), LoRA distillation (rank 4 on the MLP matrices and on all linear
layers) and the hybrid (distillation started from the static adapter). Prints one table per model and the
issue's bars; writes ``results.json`` and the figure (held-out KL and accuracy vs wall time) atomically.

``--model``: a zoo name (the shipped folder if this install has it, else ``runs/zoo/<name>``; a run still in
training is read from its checkpoint and marked ``partial``) or a zoo model folder. ``--quick``: tiny random
models of both architectures, one context per family, 10 steps: a smoke run (< 60 s), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from _common import machine  # noqa: E402

FAMILY_ORDER = ("function", "facts", "instruction")
CURVES = (("distill_mlp", "LoRA distillation, MLP matrices"), ("distill_all", "LoRA distillation, all linear"),
          ("hybrid", "hybrid: from static (MLP, default fit)"), ("hybrid_attn", "hybrid: from static + attention"),
          ("hybrid_cv", "hybrid: from static (MLP, CV ridge + RRR)"),
          ("hybrid_shrunk", "hybrid: from static (MLP, ridge 1: shrunk), distillation's lr"))
POINTS = (("static", "drop_in", "full", "static, default fit", "s"),
          ("static_cv", "drop_in", "full", "static, CV ridge", "D"),
          ("static_attn", "drop_in", "full", "static + attention slot (CV ridge)", "*"),
          ("static_attn", "drop_in", "r4", "static + attention, rank 4 (RRR)", "^"))


def load_model(spec: str, *, quick: bool, seed: int):
    """(model, description dict) of a zoo name, a zoo folder, or (``quick``) a tiny random model of ``spec``."""
    from contextpatch.zoo import load_zoo_model
    from contextpatch.zoo.registry import MODELS_DIR

    if quick:
        from contextpatch.zoo.models import make_model

        arch = "gpt2" if "gpt2" in spec else "llama"
        m = make_model(arch, seed=seed, width=32, layers=2).eval()
        m.set_attn_implementation("eager")
        return m, {"name": spec, "source": f"random {arch}, width 32, 2 layers, seed {seed}", "partial": False}
    path = Path(spec)
    if not path.is_dir():
        shipped = MODELS_DIR / spec / "zoo.json"
        path = shipped.parent if shipped.is_file() else ROOT / "runs" / "zoo" / spec
    if (path / "zoo.json").is_file():
        model, meta = load_zoo_model(path)
        return model.eval(), {"name": meta.get("name", spec), "source": str(path), "partial": False,
                              "steps": meta.get("steps"), "parameters": meta.get("parameters")}
    if (path / "checkpoint" / "state.pt").is_file():
        from contextpatch.zoo.train import checkpoint_model

        model, info = checkpoint_model(path)
        return model, {"name": spec, "source": f"{path}/checkpoint (training in progress)", "partial": True,
                       "steps": info["step"]}
    raise SystemExit(f"error: no zoo model {spec!r} (not shipped, no {path}/zoo.json, no checkpoint)")


def warm_up(model, context) -> None:
    """One small static fit and two distillation steps before anything is timed (lazy initialisation, allocator)."""
    from contextpatch import fit_static
    from contextpatch.engine import distill_lora

    qs = [q.ids for q in context.calibration[:2]]
    fit_static(model, context.context_ids, qs, keep_prefix=1, renumber_positions=True, attention=True)
    distill_lora(model, context.context_ids, qs, qs, rank=2, steps=2, eval_every=2, keep_prefix=1,
                 renumber_positions=True)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def family_table(results: list[dict]) -> list[dict]:
    """Per family: mean held-out KL / top-1 / accuracy of each method over the family's contexts."""
    rows = []
    for fam in FAMILY_ORDER:
        rs = [r for r in results if r["family"] == fam]
        if not rs:
            continue

        def row(label, get, time_of=None, rs=rs, fam=fam):
            vals = [get(r) for r in rs]
            rows.append({"family": fam, "method": label, "kl": _mean([v["kl"] for v in vals if "kl" in v]),
                         "top1": _mean([v["top1"] for v in vals if "top1" in v]),
                         "accuracy": _mean([v["accuracy"] for v in vals]),
                         "recovered": _mean([v.get("recovered") for v in vals]),
                         "calibration_kl": _mean([v.get("calibration_kl") for v in vals]),
                         "seconds": _mean([time_of(v) for v in vals]) if time_of else None})
        row("with context", lambda r: {**r["with_context"], "kl": 0.0, "top1": 1.0})
        row("no context (drop-in)", lambda r: r["no_context"]["drop_in"])
        row("no context (fitted positions)", lambda r: r["no_context"]["fitted"])
        for mode in ("drop_in", "fitted"):
            for rk in ("r1", "r4", "r16", "full"):
                if rk in rs[0]["static"][mode]:
                    row(f"static {rk} ({mode.replace('_', '-')})", lambda r, m=mode, k=rk: r["static"][m][k],
                        lambda v: v["fit_s"])
        row("static full, CV ridge (drop-in)", lambda r: r["static_cv"]["drop_in"]["full"], lambda v: v["fit_s"])
        for rk in ("r1", "r4", "r16"):
            if rk in rs[0]["static_rrr"]["drop_in"]:
                row(f"static {rk}, CV ridge + RRR (drop-in)", lambda r, k=rk: r["static_rrr"]["drop_in"][k],
                    lambda v: v["fit_s"])
        for rk in ("r1", "r4", "r16", "full"):
            if rk in rs[0]["static_attn"]["drop_in"]:
                row(f"static + attention {rk} (drop-in)", lambda r, k=rk: r["static_attn"]["drop_in"][k],
                    lambda v: v["fit_s"])
        row("static + attention full (fitted)", lambda r: r["static_attn"]["fitted"]["full"], lambda v: v["fit_s"])
        if "static_shrunk" in rs[0]:
            rk = next(iter(rs[0]["static_shrunk"]["drop_in"]))
            row(f"static {rk}, ridge {rs[0]['static_shrunk']['drop_in'][rk]['ridge']:g} + RRR (drop-in; the "
                "shrunk hybrid's start)", lambda r, k=rk: r["static_shrunk"]["drop_in"][k], lambda v: v["fit_s"])
        for name, label in CURVES:
            if name in rs[0]:
                row(f"{label}, {rs[0][name]['final']['step']} steps", lambda r, n=name: r[n]["final"],
                    lambda v: v["wall_s"])
    return rows


def bars(results: list[dict]) -> dict:
    """The issue's bars over all contexts of one model (each also per context in results)."""
    out: dict = {}
    for key in ("static", "static_attn", "static_attn_r4"):
        sp = [r["bars"]["speedup"][key] for r in results if key in r["bars"]["speedup"]]
        out[f"speedup_{key}"] = {"median_ratio": float(np.median([s["ratio"] for s in sp])),
                                 "min_ratio": float(min(s["ratio"] for s in sp)),
                                 "reached": sum(s["reached"] for s in sp), "contexts": len(sp),
                                 "contexts_ratio_ge_10": sum(s["ratio"] >= 10 for s in sp)}
    from contextpatch.study.adapters import HYBRIDS

    for name in (f"{h}_steps" for h in HYBRIDS):
        hs = [r["bars"][name] for r in results if name in r["bars"]]
        fr = [h["fraction"] for h in hs]
        out[name] = {"contexts": len(hs), "reached": sum(f is not None for f in fr),
                     "within_third": sum(f is not None and f <= 1 / 3 for f in fr), "fractions": fr}
    ins = [r for r in results if r["family"] == "instruction"]
    if ins:
        acc_c = _mean([r["with_context"]["accuracy"] for r in ins])
        acc_n = _mean([r["no_context"]["drop_in"]["accuracy"] for r in ins])
        share = {}
        for key, get in {"static": lambda r: r["static"]["drop_in"]["full"],
                         "static_cv": lambda r: r["static_cv"]["drop_in"]["full"],
                         "static_attn": lambda r: r["static_attn"]["drop_in"]["full"],
                         "distill_mlp": lambda r: r["distill_mlp"]["final"],
                         "distill_all": lambda r: r["distill_all"]["final"] if "distill_all" in r else None}.items():
            vals = [get(r) for r in ins]
            if all(v is not None for v in vals):
                acc = _mean([v["accuracy"] for v in vals])
                share[key] = None if acc_c - acc_n <= 0 else (acc - acc_n) / (acc_c - acc_n)
        out["instruction_recovered"] = {"with_context": acc_c, "no_context": acc_n, "share": share}
    return out


def diagnostics_summary(results: list[dict], family: str = "instruction") -> dict:
    """Mean over the family's contexts: attention share on the context per layer, and per method the residual
    mismatch per layer (after attention / block output) and the KL at the first query-token indices."""
    rs = [r["diagnostics"] for r in results if r["family"] == family and "diagnostics" in r]
    if not rs:
        return {}
    out: dict = {"contexts": len(rs), "context_attention": np.mean([d["context_attention"] for d in rs], 0).tolist(),
                 "mismatch": {}, "kl_by_position": {}}
    for name in rs[0]["mismatch"]:
        L = len(rs[0]["mismatch"][name])
        out["mismatch"][name] = [{k: float(np.mean([d["mismatch"][name][i][k] for d in rs]))
                                  for k in ("after_attention", "block_out")} for i in range(L)]
        T = min(len(d["kl_by_position"][name]) for d in rs)
        out["kl_by_position"][name] = np.mean([d["kl_by_position"][name][:T] for d in rs], 0).tolist()
    out["head_correction"] = {w: {k: float(np.mean([d["head_correction"][w][k] for d in rs]))
                                  for k in ("kl", "accuracy")} for w in ("before", "after")}
    if all(d.get("linear_explained") for d in rs):
        le = [d["linear_explained"] for d in rs]
        out["linear_explained"] = {layer: {f: {sp: float(np.mean([x[layer][f][sp] for x in le]))
                                               for sp in ("calibration", "held_out")} for f in le[0][layer]}
                                   for layer in le[0]}
    return out


def print_table(model: dict, rows: list[dict], b: dict) -> None:
    print(f"\n== {model['name']} ({model['source']})")
    print(f"{'family':<12} {'method':<50} {'KL':>7} {'top-1':>6} {'acc':>6} {'recov':>6} {'time s':>7} {'cal KL':>7}")
    def f(v, p=3):
        return "-" if v is None else f"{v:.{p}f}"

    for r in rows:
        print(f"{r['family']:<12} {r['method']:<50} {f(r['kl']):>7} {f(r['top1'], 2):>6} {f(r['accuracy'], 2):>6} "
              f"{f(r['recovered'], 2):>6} {f(r['seconds'], 2):>7} {f(r['calibration_kl']):>7}")
    print("bars:", json.dumps(b, indent=1))


def print_sweep(sweep: list[dict]) -> None:
    """Mean over the instruction contexts per calibration size."""
    if not sweep:
        return
    print("\ninstruction contexts, static adapters (drop-in, full rank, CV ridge) vs calibration size:")
    print(f"{'K':>5} {'tokens':>7} {'acc ctx':>8} {'acc none':>8} {'KL mlp':>7} {'rec mlp':>7} {'KL attn':>7} "
          f"{'rec attn':>8} {'fit s':>6}")
    for K in sorted({r["calibration_queries"] for r in sweep}):
        rs = [r for r in sweep if r["calibration_queries"] == K]

        def m(get, rs=rs):
            return _mean([get(r) for r in rs])
        print(f"{K:>5} {m(lambda r: r['calibration_tokens']):>7.0f} {m(lambda r: r['with_context']):>8.2f} "
              f"{m(lambda r: r['no_context']):>8.2f} {m(lambda r: r['static_cv']['kl']):>7.3f} "
              f"{m(lambda r: r['static_cv']['recovered']) or 0:>7.2f} {m(lambda r: r['static_attn']['kl']):>7.3f} "
              f"{m(lambda r: r['static_attn']['recovered']) or 0:>8.2f} {m(lambda r: r['static_attn']['fit_s']):>6.1f}")


def markdown(data: dict) -> str:
    """The docs' tables from a results.json: per model the family table, the bars, the diagnostics and the sweep."""
    def f(v, p=3):
        return "–" if v is None else f"{v:.{p}f}"
    out = []
    for name, res in data["models"].items():
        out.append(f"### {name} ({res['model']['source']}, {res['seconds']:.0f} s)\n")
        out.append("| family | method | held-out KL | top-1 | exact acc. | recovered | time (s) | calibration KL |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in res["table"]:
            out.append(f"| {r['family']} | {r['method']} | {f(r['kl'])} | {f(r['top1'], 2)} | {f(r['accuracy'], 2)} | "
                       f"{f(r['recovered'], 2)} | {f(r['seconds'], 2)} | {f(r.get('calibration_kl'))} |")
        out.append("\n```json\n" + json.dumps(res["bars"], indent=1) + "\n```\n")
        d = res.get("diagnostics") or {}
        if d:
            out.append("| layer | attention on context | " + " | ".join(
                f"{m}: after attn / block out" for m in d["mismatch"]) + " |")
            out.append("|---" * (2 + len(d["mismatch"])) + "|")
            for i, share in enumerate(d["context_attention"]):
                out.append(f"| {i} | {share:.2f} | " + " | ".join(
                    f"{v[i]['after_attention']:.3f} / {v[i]['block_out']:.3f}" for v in d["mismatch"].values()) + " |")
            out.append("\nKL by query-token index: " + json.dumps(
                {k: [round(x, 3) for x in v] for k, v in d["kl_by_position"].items()}) + "\n")
            out.append("head correction (static + attention, then ΔW_U in logit space): " +
                       json.dumps(d["head_correction"]) + "\n")
            if d.get("linear_explained"):
                out.append("residual share of the after-attention mismatch a linear map leaves (calibration / "
                           "held-out): " + json.dumps(d["linear_explained"]) + "\n")
        sw = res.get("calibration_sweep") or []
        if sw:
            out.append("| K | tokens | acc. ctx | acc. none | KL MLP-only | recovered | KL + attention | recovered | "
                       "fit s (CV) |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for K in sorted({r["calibration_queries"] for r in sw}):
                rs = [r for r in sw if r["calibration_queries"] == K]

                def m(get, rs=rs):
                    return _mean([get(r) for r in rs])
                cells = [f"{m(lambda r: r['calibration_tokens']):.0f}", f(m(lambda r: r["with_context"]), 2),
                         f(m(lambda r: r["no_context"]), 2), f(m(lambda r: r["static_cv"]["kl"])),
                         f(m(lambda r: r["static_cv"]["recovered"]), 2), f(m(lambda r: r["static_attn"]["kl"])),
                         f(m(lambda r: r["static_attn"]["recovered"]), 2), f(m(lambda r: r["static_attn"]["fit_s"]), 1)]
                out.append(f"| {K} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def figure(all_results: dict, path: Path) -> None:
    """Held-out KL and accuracy vs wall time per family (mean over the family's contexts), one row pair per
    model: distillation curves and the static adapters' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from contextpatch._io import save_figure

    models = list(all_results)
    fig, axes = plt.subplots(2 * len(models), 3, figsize=(15, 6.5 * len(models)), squeeze=False)
    for mi, name in enumerate(models):
        results = all_results[name]["contexts"]
        for fi, fam in enumerate(FAMILY_ORDER):
            rs = [r for r in results if r["family"] == fam]
            ax_kl, ax_acc = axes[2 * mi, fi], axes[2 * mi + 1, fi]
            for ci, (meth, label) in enumerate(CURVES):
                if not rs or meth not in rs[0]:
                    continue
                hs = [r[meth]["history"] for r in rs]
                wall = np.mean([[h["wall_s"] for h in hist] for hist in hs], 0)
                for ax, key in ((ax_kl, "kl"), (ax_acc, "accuracy")):
                    ax.plot(np.maximum(wall, 1e-2), np.mean([[h[key] for h in hist] for hist in hs], 0),
                            color=f"C{ci}", label=label)
            for meth, mode, rk, label, marker in POINTS:
                if not rs:
                    continue
                vals = [r[meth][mode][rk] for r in rs]
                t = np.mean([v["fit_s"] for v in vals])
                ax_kl.scatter([t], [np.mean([v["kl"] for v in vals])], marker=marker, s=80, color="k", label=label,
                              zorder=5)
                ax_acc.scatter([t], [np.mean([v["accuracy"] for v in vals])], marker=marker, s=80, color="k",
                               label=label, zorder=5)
            if rs:
                ax_acc.axhline(np.mean([r["with_context"]["accuracy"] for r in rs]), color="g", ls="--",
                               label="with context")
                ax_acc.axhline(np.mean([r["no_context"]["drop_in"]["accuracy"] for r in rs]), color="r", ls=":",
                               label="no context")
                ax_kl.axhline(np.mean([r["no_context"]["drop_in"]["kl"] for r in rs]), color="r", ls=":",
                              label="no context")
            for ax, ylabel in ((ax_kl, "held-out KL(with context ‖ adapter)"), (ax_acc, "held-out exact-answer acc.")):
                ax.set_xscale("log")
                ax.set_xlabel("wall time (s): static fit, or distillation training")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{name}: {fam} ({len(rs)} contexts)")
                ax.grid(alpha=0.3)
            ax_kl.set_yscale("log")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("Held-out KL and exact-answer accuracy vs wall time (means over each family's contexts; "
                 "distillation's step 0 drawn at 0.01 s)", y=1.0)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None,
                    help="zoo name or folder (repeatable; default: icl-llama then icl-gpt2)")
    ap.add_argument("--steps", type=int, default=150, help="distillation / hybrid Adam steps")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2, help="distillation learning rate")
    ap.add_argument("--hybrid-lr", type=float, default=3e-3, help="hybrid learning rate (starts near the optimum)")
    ap.add_argument("--hybrid-ridge", type=float, default=1.0,
                    help="ridge of the shrunk hybrid's static start (hybrid_shrunk; trained at --lr)")
    ap.add_argument("--hybrid-mode", default="factors", choices=["factors", "residual"],
                    help="factors: LoRA factors start at the static adapter; residual: static merged into the frozen "
                         "base, a fresh LoRA (distillation's own init) on top")
    ap.add_argument("--ridge", type=float, default=1e-3, help="ridge of the default static fit")
    ap.add_argument("--output-patch", default="weight", choices=["auto", "bias", "weight"],
                    help="output slot of the extended static fits (the default fit keeps 'auto': GPT-2's bias)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--facts-split", default="recall", choices=["recall", "unseen"],
                    help="fact sheets: held-out chains of calibrated facts (recall) or the uncalibrated half of the "
                         "keys (unseen: the negative control)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json (default runs/adapters_zoo)")
    ap.add_argument("--figure", type=Path, default=None, help="figure path (default OUT/adapters_zoo.png)")
    ap.add_argument("--sweep", type=int, nargs="*", default=[16, 64, 256],
                    help="instruction calibration sizes of the static-only sweep (none: skip it)")
    ap.add_argument("--quick", action="store_true", help="tiny random models, one context per family, 10 steps")
    ap.add_argument("--render", type=Path, default=None, help="only print the markdown tables of a results.json")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="merge the results.json of runs over different models (e.g. one process per model) into "
                         "OUT/results.json and the figure")
    a = ap.parse_args(argv)
    if a.render:
        print(markdown(json.loads(a.render.read_text())))
        return 0
    if a.combine:
        from contextpatch._io import atomic_write_json, ensure_out_dir

        parts = [json.loads(f.read_text()) for f in a.combine]
        merged = {"meta": {"combined_from": [str(f) for f in a.combine], "runs": [d["meta"] for d in parts]},
                  "models": {k: v for d in parts for k, v in d["models"].items()}}
        out = ensure_out_dir(a.out or ROOT / "runs" / "adapters_zoo")
        atomic_write_json(out / "results.json", merged)
        figure(merged["models"], a.figure or out / "adapters_zoo.png")
        print(f"wrote {out / 'results.json'} and {a.figure or out / 'adapters_zoo.png'}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.steps < 1 or a.eval_every < 1 or a.lora_rank < 1:
        ap.error("--steps, --eval-every and --lora-rank must be ≥ 1")
    if a.quick:
        a.steps, a.eval_every = 10, 5
    out = a.out or ROOT / "runs" / ("adapters_zoo_quick" if a.quick else "adapters_zoo")
    fig_path = a.figure or out / "adapters_zoo.png"
    from contextpatch._io import atomic_write_json, ensure_out_dir
    from contextpatch.study.adapter_diagnostics import diagnostics
    from contextpatch.study.adapters import INSTRUCTIONS, calibration_sweep, compare_methods, zoo_contexts

    ensure_out_dir(out)
    torch.manual_seed(a.seed)
    contexts = zoo_contexts(seed=a.seed, quick=a.quick, facts_split=a.facts_split)
    ranks = (4, None) if a.quick else (1, 4, 16, None)
    all_results: dict = {}
    t_all = time.perf_counter()
    for spec in a.model or ["icl-llama", "icl-gpt2"]:
        model, desc = load_model(spec, quick=a.quick, seed=a.seed)
        warm_up(model, contexts[0])
        t0 = time.perf_counter()
        results = []
        for c in contexts:
            results.append(compare_methods(model, c, ranks=ranks, lora_rank=a.lora_rank, steps=a.steps, lr=a.lr,
                                           hybrid_lr=a.hybrid_lr, hybrid_mode=a.hybrid_mode,
                                           hybrid_ridge=a.hybrid_ridge, eval_every=a.eval_every, ridge=a.ridge,
                                           diagnose=diagnostics, output_patch=a.output_patch, seed=a.seed))
            print(f"  {desc['name']}: {c.name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows, b, diag = family_table(results), bars(results), diagnostics_summary(results)
        print_table(desc, rows, b)
        print("diagnostics (instruction contexts, held-out):", json.dumps(diag, indent=1))
        sweep = calibration_sweep(model, sizes=(4, 8) if a.quick else tuple(a.sweep), seed=a.seed,
                                  modes=INSTRUCTIONS[:1] if a.quick else INSTRUCTIONS,
                                  output_patch=a.output_patch) if a.sweep else []
        print_sweep(sweep)
        all_results[desc["name"]] = {"model": desc, "contexts": results, "table": rows, "bars": b,
                                     "diagnostics": diag, "calibration_sweep": sweep,
                                     "seconds": time.perf_counter() - t0}
    meta = {"seed": a.seed, "steps": a.steps, "eval_every": a.eval_every, "lora_rank": a.lora_rank, "lr": a.lr,
            "hybrid_lr": a.hybrid_lr, "hybrid_mode": a.hybrid_mode,
            "hybrid_ridge": a.hybrid_ridge, "ridge": a.ridge, "facts_split": a.facts_split,
            "output_patch": a.output_patch, "ranks": [r or "full" for r in ranks], "quick": a.quick,
            "machine": machine(), "seconds": time.perf_counter() - t_all,
            "command": "python benchmarks/adapters_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_json(out / "results.json", {"meta": meta, "models": all_results})
    figure(all_results, fig_path)
    print(f"\nwrote {out / 'results.json'} and {fig_path} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
