"""``report.md`` of the zoo study: the measured numbers as tables, no interpretation beyond what they show."""

from __future__ import annotations

__all__ = ["render_report"]


def _f(x, nd=3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if isinstance(x, float) and (abs(x) < 1e-3 and x != 0):
        return f"{x:.1e}"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render_report(m: dict) -> str:
    lines = [f"# Study of `{m['model']}` ({m['arch']}, {m['parameters']} parameters)", "",
             f"Preset `{m['preset']}`, seed {m['seed']}; wall seconds per part: {m['seconds']}. Every number is "
             "in metrics.json. Figures: dynamics.png, thought_patch.png, finetune.png.", "",
             "## 1. Exact patches on a model that uses its context", "",
             "| family | prompts | verify max abs diff float32 (float64) | unpatched control (min) | generation "
             "agreement | accuracy with context / patched without / plain without |", "|---|---|---|---|---|---|"]
    for fam, r in m["exactness"].items():
        lines.append(f"| {fam} (k={r['shots']}) | {r['prompts']} | {_f(r['verify_max_abs_diff_float32'])} "
                     f"({_f(r['verify_max_abs_diff_float64'])}) | {_f(r['verify_control_min_max_abs_diff'])} | "
                     f"{_f(r['generation_agreement'], 2)} | {_f(r['accuracy_with_context'], 2)} / "
                     f"{_f(r['accuracy_patched_without_context'], 2)} / {_f(r['accuracy_without_context'], 2)} |")
    d = m["dynamics"]
    acc = d["accuracy"]
    marks = [i for i in (0, 1, 2, 4, 8, 16, 32) if i < len(acc)]
    lines += ["", "## 2. Implicit dynamics over the demonstrations (function induction)", "",
              f"{d['prompts']} prompts, {len(acc) - 1} demonstrations each (noisy fraction "
              f"{_f(d['noisy_fraction'], 2)}). Accuracy after i demonstrations: "
              + ", ".join(f"i={i}: {_f(acc[i], 2)}" for i in marks) + ".", "",
              "| layer | matrix | ‖ΔW_k‖/‖W‖ | update late/early (i > k/2 vs i ≤ 4) | noisy/clean update | "
              "update when already right / wrong |", "|---|---|---|---|---|---|"]
    for li, name in enumerate(d["matrices"]):
        lines.append(f"| {li} | `{name}` | {_f(d['patch_rel'][li][-1])} | {_f(d['step_late_over_early'][li])} | "
                     f"{_f(d['noisy_over_clean_step'][li])} | {_f(d['step_when_right_over_wrong'][li])} |")
    lines += ["", "## 3. Thought patches: held-out accuracy vs calibration queries K", "",
              "| family | with context | without | " + " | ".join(f"K={k}" for k in
                                                               next(iter(m["thought_patch"].values()))["ks"]) + " |",
              "|---|---|---|" + "---|" * len(next(iter(m["thought_patch"].values()))["ks"])]
    for fam, r in m["thought_patch"].items():
        lines.append(f"| {fam} | {_f(r['with_context_accuracy'], 2)} | {_f(r['without_context_accuracy'], 2)} | "
                     + " | ".join(_f(a, 2) for a in r["held_out_accuracy"]) + " |")
    f = m["finetune"]
    lines += ["", "## 4. Explicit online SGD vs the implicit increments", "",
              f"η = {f['lr']:g} (grid {f['lr_grid']}), {f['prompts']} test prompts of {f['shots']} demonstrations. "
              f"Query NLL with the context after 0 / k demonstrations: {_f(f['query_nll_with_context'][0])} / "
              f"{_f(f['query_nll_with_context'][-1])}; after k SGD steps: {_f(f['query_nll_sgd'][-1])}. "
              f"Share of positive per-step alignments: {_f(f['alignment_step_positive_share'], 2)}.", "",
              "| layer | mean per-step alignment | final cumulative alignment |", "|---|---|---|"]
    for li, _ in enumerate(f["matrices"]):
        lines.append(f"| {li} | {_f(f['alignment_step_mean'][li])} | {_f(f['alignment_cumulative_final'][li])} |")
    return "\n".join(lines) + "\n"
