"""contextpatch.study: prompts, implicit dynamics, explicit SGD, thought patches and the `study` command.

Math checks run on a tiny random zoo-shaped Llama/GPT-2 (fast); the end-to-end checks run on the shipped zoo
model, a language model that really uses its context (skipped only if it is not shipped)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from contextpatch.engine import extract
from contextpatch.study.dynamics import _sgd_run, _weight_norms, explicit_finetune, implicit_dynamics, prefix_batch
from contextpatch.study.prompts import answer_correct, make_prompts
from contextpatch.study.thought import fixed_contexts
from contextpatch.zoo.models import make_model
from contextpatch.zoo.registry import MODELS_DIR
from contextpatch.zoo.tasks import apply_mode
from contextpatch.zoo.tokenizer import BOS, word_ids


def tiny(arch="llama"):
    return make_model(arch, seed=0, width=32, layers=2, heads=2, mlp=64).eval()


def shipped(name="icl-llama"):
    if not (MODELS_DIR / name / "zoo.json").is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    from contextpatch.zoo import load_zoo_model

    return load_zoo_model(name)[0]


def test_prompt_spans_decode_to_the_example():
    inv = {i: w for w, i in word_ids().items()}
    for fam in ("function", "facts", "instruction"):
        for p in make_prompts(fam, 5, 4, seed=3):
            words = lambda t: " ".join(inv[int(i)] for i in t)  # noqa: E731
            q, a = p.example.pairs[0]
            assert int(p.ids[0]) == BOS
            assert words(p.ids[1: p.context_end]) == p.example.context
            assert words(p.ids[p.context_end: p.answer_start]) == q and words(p.answer_ids) == a
            assert torch.equal(p.no_context_ids, torch.cat([p.ids[:1], p.ids[p.context_end:]]))


def test_answer_correct_matches_hf_greedy_decoding():
    """Teacher-forced exact match == HF's own greedy generation reproducing the answer (independent code)."""
    model = tiny()
    for p in make_prompts("instruction", 6, 2, seed=0):
        logits = model(input_ids=p.ids[None]).logits[0]
        head = p.ids[: p.answer_start][None]
        gen = model.generate(head, attention_mask=torch.ones_like(head), max_new_tokens=p.answer_ids.numel(),
                             min_new_tokens=p.answer_ids.numel(), do_sample=False, pad_token_id=0)[0, head.shape[1]:]
        assert answer_correct(logits, p) == bool((gen == p.answer_ids).all())
        # a forced case: make the answer the model's own greedy continuation -> correct
        forced = torch.cat([p.ids[: p.answer_start], gen])
        from contextpatch.study.prompts import Prompt

        q = Prompt(p.family, p.shots, forced, p.context_end, p.answer_start, p.example)
        assert answer_correct(model(input_ids=forced[None]).logits[0], q)


def test_fixed_contexts_hold_out_queries_and_answers_follow_the_task():
    inv = {i: w for w, i in word_ids().items()}
    for fam in ("function", "facts", "instruction"):
        for ex, pool, held, _ in fixed_contexts(fam, 2, seed=5):
            pool_q = {tuple(p.query_ids[: p.answer_start - p.context_end].tolist()) for p in pool}
            held_q = {tuple(p.query_ids[: p.answer_start - p.context_end].tolist()) for p in held}
            if fam != "instruction":       # random lists may repeat by chance; keys and x values never do
                assert not pool_q & held_q
            for p in pool + held:
                assert torch.equal(p.context_ids, pool[0].context_ids)
                q = [inv[int(t)] for t in p.ids[p.context_end: p.answer_start]]
                a = [inv[int(t)] for t in p.answer_ids]
                if fam == "facts":         # the sheet binds the key to the answer
                    assert f"{q[0]} {a[0]} ;" in ex.context
                elif fam == "instruction":
                    mode = ex.head.removeprefix("mode: ").removesuffix(" ;")
                    assert [int(x) for x in a] == apply_mode(mode, [int(x) for x in q[:-1]])
                else:                      # the shift shown by the clean demonstrations
                    shifts = {(int(dy) - int(dq.split()[0])) % 11 for dq, dy, clean in ex.demos if clean}
                    assert len(shifts) == 1 and (int(a[0]) - int(q[0])) % 11 in shifts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamics_norms_match_separate_extractions(arch):
    """The batched per-prefix patches and the Gram-formula update norms equal dense norms of patches from one
    separate extract() per prefix (context span (1, 1+4i), BOS kept)."""
    model = tiny(arch)
    p = make_prompts("function", 1, 5, seed=1)[0]
    names, norms, mods = _weight_norms(model)
    from contextpatch.study.dynamics import _prompt_dynamics

    r = _prompt_dynamics(model, p, norms)
    ids, am, cm = prefix_batch(p)
    prev = None
    for i in range(ids.shape[0]):
        n = int(am[i].sum())
        P = extract(model, ids[i: i + 1, :n], context=(1, n - 2), bos_is_context=False, renumber_positions=True)
        for li, layer in enumerate(P.layers):
            W = next(iter(layer.inputs.values()))
            dense = (W.U[0, -1] @ W.V[0, -1].T).double()
            assert abs(float(dense.norm()) / norms[li] - r["patch"][li][i]) < 1e-6
            step = dense if prev is None else dense - prev[li]
            assert abs(float(step.norm()) / norms[li] - r["step"][li][i]) < 1e-6
        prev = [(next(iter(lay.inputs.values())).U[0, -1] @ next(iter(lay.inputs.values())).V[0, -1].T).double()
                for lay in P.layers]
    assert max(max(s) for s in r["step"]) > 1e-4          # control: the updates are not all zero


def test_sgd_steps_are_minus_lr_times_an_independent_gradient():
    model = tiny()
    p = make_prompts("function", 1, 3, seed=2)[0]
    names, _, _ = _weight_norms(model)
    lr = 0.05
    nll, steps = _sgd_run(model, p, lr, names)
    # independent: first demonstration's gradient on a fresh copy, cross-entropy via torch's own function
    ref = copy.deepcopy(model)
    mods = [dict(ref.named_modules())[n] for n in names]
    x, arrow, y = [word_ids()[w] for w in f"{p.example.demos[0][0]} {p.example.demos[0][1]}".split()]
    logits = ref(input_ids=torch.tensor([[BOS, x, arrow, y]])).logits[0, 2]
    loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([y]))
    grads = torch.autograd.grad(loss, [m.weight for m in mods])
    for li, g in enumerate(grads):
        assert torch.allclose(steps[li][0], -lr * g.double(), atol=1e-7)
    assert len(nll) == len(p.example.demos) + 1 and all(np.isfinite(nll))


def test_dynamics_and_finetune_summaries_are_consistent():
    model = tiny()
    d = implicit_dynamics(model, n=2, shots=4, seed=0)
    assert len(d["accuracy"]) == 5 and len(d["patch_rel"][0]) == 5 and d["patch_rel"][0][0] == 0.0
    f = explicit_finetune(model, n=2, n_tune=1, shots=3, lrs=(1e-2, 1e-1), seed=0)
    assert f["lr"] in (1e-2, 1e-1) and f["lr_grid"][str(f["lr"])] == min(f["lr_grid"].values())
    # the implicit loss after 0 demonstrations is the no-context loss, the same start as SGD's
    assert abs(f["query_nll_with_context"][0] - f["query_nll_sgd"][0]) < 1e-6


@pytest.mark.parametrize("name", ["icl-llama", "icl-gpt2"])
def test_study_on_the_shipped_model_quick(tmp_path, name):
    """End to end on a trained zoo model (the Llama: weight slot; the GPT-2 twin: bias slot, Conv1D): exact
    patches (float32 ≤ 1e-4 against a plain forward pass), patched greedy generation equal to HF's with-context
    generation, every output file written."""
    shipped(name)
    from contextpatch.study.run import run_study

    m = run_study(name, tmp_path, preset="quick", progress=False)
    assert m["model"] == name
    for fam, r in m["exactness"].items():
        assert r["verify_max_abs_diff_float32"] <= 1e-4, fam
        assert r["verify_control_min_max_abs_diff"] > 1e-2, fam          # control: the context matters
        assert r["generation_agreement"] == 1.0, fam
    for f in ("metrics.json", "report.md", "dynamics.png", "thought_patch.png", "finetune.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["seed"] == 0


def test_study_cli_bad_input(tmp_path):
    from typer.testing import CliRunner

    from contextpatch.cli import app

    r = CliRunner().invoke(app, ["study", "--model", "no-such-model", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "icl-llama" in r.output and not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["study", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "zoo.json" in r.output
