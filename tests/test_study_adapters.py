"""The adapters study (``contextpatch.study.adapters``, benchmarks/adapters_zoo.py): contexts and held-out
queries, the metrics against hand-built cases, the comparison's plumbing on a tiny random model, the diagnostics,
and the benchmark's --quick smoke run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contextpatch import ContextPatchError, fit_static
from contextpatch.adapters import tiny_model
from contextpatch.study import adapter_diagnostics as D
from contextpatch.study import adapters as A
from contextpatch.zoo.models import make_model
from contextpatch.zoo.tasks import vocabulary

ROOT = Path(__file__).resolve().parents[1]
WORD = {w: i for i, w in enumerate(vocabulary())}


def test_make_query_ids_and_answer_spans_by_hand():
    q = A.make_query([("3 ->", "7"), ("5 ->", "9")])
    assert q.ids.tolist() == [WORD["3"], WORD["->"], WORD["7"], WORD[";"], WORD["5"], WORD["->"], WORD["9"]]
    assert q.answers == ((2, 3), (6, 7))
    q = A.make_query([("4 1 9 =>", "9 1 4")])
    assert q.answers == ((4, 7),) and q.ids[4:].tolist() == [WORD["9"], WORD["1"], WORD["4"]]
    with pytest.raises(ContextPatchError):
        A.make_query([])


def _words(ids):
    vocab = vocabulary()
    return [vocab[i] for i in ids.tolist()]


def test_contexts_hold_out_what_they_claim():
    fn = A.function_contexts(n=3, seed=0)
    assert len(fn) == 3 and len({c.text for c in fn}) == 3
    for c in fn:
        demo_x = {w for i, w in enumerate(c.text.split()) if c.text.split()[i + 1:i + 2] == ["->"]}
        cal_x = {_words(q.ids)[0] for q in c.calibration} | {_words(q.ids)[4] for q in c.calibration
                                                                if len(q.ids) > 3}
        held_x = {_words(q.ids)[0] for q in c.held_out}
        assert len(cal_x) == 4 and len(held_x) == 4 and not cal_x & held_x and not (cal_x | held_x) & demo_x
        assert len(c.text.split()) == 16 * 4 and c.context_ids[0] == WORD["<bos>"]
        b = int(c.name.split("+ ")[1].split(" mod")[0])
        for q in c.held_out:                                   # answers follow the rule in the name
            x, _, y = _words(q.ids)
            assert int(y) == (int(x) + b) % 11
    for split in A.FACT_SPLITS:
        facts = A.facts_contexts(sizes=(8, 16, 32), seed=0, split=split)
        for c, k in zip(facts, (8, 16, 32), strict=True):
            sheet = dict(zip(c.text.split()[0::3], c.text.split()[1::3], strict=True))
            assert len(sheet) == k and split in c.name
            asked_cal = {w for q in c.calibration for w in _words(q.ids) if w.startswith("k")}
            asked_held = {w for q in c.held_out for w in _words(q.ids) if w.startswith("k")}
            if split == "unseen":       # the other half of the keys, never calibrated
                assert len(asked_held) == k // 2 and not asked_cal & asked_held and asked_cal | asked_held == set(sheet)
            else:                       # every key calibrated; held out = new chains of three distinct keys
                assert asked_cal == set(sheet) and len(c.held_out) == k
                assert all(len(q.answers) == 3 and len(set(_words(q.ids)[0::3])) == 3 for q in c.held_out)
                assert not {q.text for q in c.held_out} & {q.text for q in c.calibration}
            for q in list(c.calibration) + list(c.held_out):       # every answer is the sheet's value
                w = _words(q.ids)
                assert all(sheet[w[s - 1]] == w[s] for s, _ in q.answers)
    ins = A.instruction_contexts(modes=(("reverse", 0), ("sort", 2)), calibration=20, held_out=10, seed=1)
    assert [c.text.split()[:3] for c in ins] == [["mode:", "reverse", ";"], ["mode:", "sort", ";"]]
    assert len(ins[1].text.split(";")) == 4                      # the instruction line + 2 demonstrations + ""
    for c, fn_ in zip(ins, (lambda xs: xs[::-1], sorted), strict=True):
        qs = list(c.calibration) + list(c.held_out)
        assert len({q.text for q in qs}) == 30
        for q in qs:
            w = _words(q.ids)
            arrow = w.index("=>")
            assert w[arrow + 1:] == fn_(w[:arrow])
    again = A.instruction_contexts(modes=(("reverse", 0), ("sort", 2)), calibration=20, held_out=10, seed=1)
    assert [q.text for q in again[0].held_out] == [q.text for q in ins[0].held_out]      # seeded
    more = A.instruction_contexts(modes=(("reverse", 0), ("sort", 2)), calibration=40, held_out=10, seed=1)
    assert [q.text for q in more[1].held_out] == [q.text for q in ins[1].held_out]       # same held-out set,
    assert [q.text for q in more[1].calibration[:20]] == [q.text for q in ins[1].calibration]   # nested calibration
    with pytest.raises(ContextPatchError):
        A.facts_contexts(sizes=(40,))
    with pytest.raises(ContextPatchError, match="split"):
        A.facts_contexts(split="some")
    with pytest.raises(ContextPatchError):
        A.instruction_contexts(modes=(("shuffle", 0),))


def test_answer_accuracy_and_score_against_hand_computation():
    V = 5
    qa = A.Query(torch.tensor([0, 1, 2]), ((1, 3),), "a")       # answer = tokens 1, 2 predicted at t = 0, 1
    qb = A.Query(torch.tensor([3, 4, 0]), ((2, 3),), "b")       # answer = token 0 predicted at t = 1
    logits = torch.zeros(2, 3, V)
    logits[0, 0, 1] = logits[0, 1, 2] = 5.0                     # query a: both answer tokens right
    logits[1, 1, 3] = 5.0                                       # query b: wrong (predicts 3, answer 0)
    assert A.answer_accuracy(logits, [qa, qb]) == 0.5
    logits[1, 1, 0] = 9.0
    assert A.answer_accuracy(logits, [qa, qb]) == 1.0
    logits[0, 1, 4] = 6.0                                       # the second answer token of a goes wrong
    assert A.answer_accuracy(logits, [qa, qb]) == 0.5
    # KL by hand on two tokens: teacher p = softmax(t), student q = softmax(s), KL = Σ p log(p/q)
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    s = torch.tensor([[[0.0, 0.5], [0.0, 2.0]]])
    p0 = [math.e / (math.e + 1), 1 / (math.e + 1)]
    q0 = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    kl0 = sum(pi * math.log(pi / qi) for pi, qi in zip(p0, q0, strict=True))
    res = A.score(s, t, torch.tensor([[True, True]]), [A.Query(torch.tensor([0, 1]), ((1, 2),), "x")])
    assert res["kl"] == pytest.approx(kl0 / 2, rel=1e-9) and res["top1"] == 0.5   # float32 inputs
    res = A.score(s, t, torch.tensor([[False, True]]), [A.Query(torch.tensor([0, 1]), ((1, 2),), "x")])
    assert res["kl"] == pytest.approx(0.0, abs=1e-15) and res["top1"] == 1.0
    assert A.recovered_share(0.5, 0.1, 0.9) == pytest.approx(0.5)
    assert A.recovered_share(0.5, 0.4, 0.4) is None
    per = D.kl_by_position(s, t, torch.tensor([[True, True]]))
    assert per == pytest.approx([kl0, 0.0], abs=1e-12)


def _tiny_context(n_cal=6, n_held=4):
    c = A.instruction_contexts(modes=(("reverse", 0),), calibration=n_cal, held_out=n_held, seed=0)[0]
    return c


def test_compare_methods_plumbing_on_a_tiny_random_model():
    model = make_model("llama", seed=0, width=32, layers=2).eval()
    model.set_attn_implementation("eager")
    c = _tiny_context()
    res = A.compare_methods(model, c, ranks=(2, None), lora_rank=2, steps=4, eval_every=2, ridges=(1e-2, 1.0),
                            diagnose=D.diagnostics)
    json.dumps(res)                                             # JSON-able
    assert set(res["static"]) == {"drop_in", "fitted"} and set(res["static"]["drop_in"]) == {"r2", "full"}
    assert set(res["static_attn"]["drop_in"]) == {"r2", "full"} and res["static_cv"]["drop_in"]["full"]["ridge"] in (
        1e-2, 1.0)
    for name in ("distill_mlp", "distill_all", "hybrid", "hybrid_attn", "hybrid_cv", "hybrid_shrunk"):
        assert [h["step"] for h in res[name]["history"]] == [0, 2, 4]
        assert res[name]["history"][-1]["forward_backward"] == 4 and "accuracy" in res[name]["history"][-1]
    # the hybrid's step 0 is the static adapter it starts from, measured by two code paths (peft vs hooks)
    for hyb, (meth, rk) in (("hybrid", ("static", "r2")), ("hybrid_attn", ("static_attn", "r2")),
                            ("hybrid_cv", ("static_rrr", "r2")), ("hybrid_shrunk", ("static_shrunk", "r2"))):
        assert res[hyb]["history"][0]["kl"] == pytest.approx(res[meth]["drop_in"][rk]["kl"], rel=1e-4, abs=1e-7)
    assert res["with_context"]["accuracy"] == A.answer_accuracy(
        A.with_context(model, c, A.run_queries(model, c, c.held_out, **A.DROP_IN)), c.held_out)
    b = res["bars"]
    assert set(b["speedup"]) == {"static", "static_attn", "static_attn_r2"}
    assert all(v["ratio"] >= 0 for v in b["speedup"].values()) and "hybrid_steps" in b and "hybrid_cv_steps" in b
    assert "hybrid_shrunk_steps" in b and res["static_shrunk"]["drop_in"]["r2"]["ridge"] == 1.0
    assert res["hybrid_shrunk"]["config"]["lr"] == 1e-2 and res["hybrid"]["config"]["lr"] == 3e-3
    d = res["diagnostics"]
    assert set(d["mismatch"]) == {"static", "static_cv", "static_attn", "distill_mlp"}
    assert len(d["context_attention"]) == 2
    assert all(len(v) == 2 and all(x["after_attention"] >= 0 for x in v) for v in d["mismatch"].values())
    T = max(len(q.ids) for q in c.held_out)
    assert all(len(v) == T for v in d["kl_by_position"].values())
    le = d["linear_explained"]["0"]
    assert set(le) == {"a", "x_tilde", "a+x_tilde"} and all(0 <= v["calibration"] <= 1 + 1e-9 for v in le.values())
    hc = d["head_correction"]
    assert hc["before"]["kl"] == pytest.approx(res["static_attn"]["drop_in"]["full"]["kl"], rel=1e-9)


def test_fit_static_cv_selects_on_calibration_only():
    model = make_model("llama", seed=1, width=32, layers=2).eval()
    model.set_attn_implementation("eager")
    c = _tiny_context(n_cal=8, n_held=2)
    st, info = A.fit_static_cv(model, c, ridges=(1e-3, 1.0), **A.DROP_IN)
    assert set(info["cv_kl"]) == {1e-3, 1.0} and info["ridge"] == min(info["cv_kl"], key=info["cv_kl"].get)
    assert st.meta.options["ridge"] == info["ridge"] and st.meta.options["num_calibration_queries"] == 8
    with pytest.raises(ContextPatchError):
        A.fit_static_cv(model, c, split=1.5)


def test_residual_mismatch_is_zero_where_the_adapter_interpolates_and_one_without_it():
    """One calibration query of one token, ridge 0, attention slot: every layer's residual right after attention
    is interpolated, so the mismatch ratio is ~0 on that query; with no adapter it is exactly 1 (control)."""
    model = tiny_model("llama", dtype=torch.float64, seed=0)
    ctx = torch.randint(3, 100, (8,), generator=torch.Generator().manual_seed(0))
    q = A.Query(torch.tensor([42]), ((0, 1),), "q")
    c = A.FixedContext("instruction", "toy", ctx, (q,), (q,), 0, "toy")
    st = fit_static(model, ctx, [q.ids], ridge=0.0, attention=True, output_patch="weight", **A.FITTED)
    fitted = D.residual_mismatch(model, c, [q], st, **A.FITTED)
    none = D.residual_mismatch(model, c, [q], None, **A.FITTED)
    assert all(r["after_attention"] <= 1e-12 and r["block_out"] <= 1e-10 for r in fitted), fitted
    assert all(r["after_attention"] == 1.0 and r["block_out"] == 1.0 for r in none)
    share = D.context_attention(model, c, [q])
    assert len(share) == 3 and all(0.0 < s < 1.0 for s in share)


@pytest.mark.slow
def test_benchmark_quick_runs_under_a_minute(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/adapters_zoo.py", "--quick", "--threads", "1", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["seconds"] < 60 and data["meta"]["seed"] == 0
    assert set(data["models"]) == {"icl-llama", "icl-gpt2"} and (tmp_path / "adapters_zoo.png").stat().st_size > 0
