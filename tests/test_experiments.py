"""The in-context linear-regression experiments: quick preset end to end, and bars on the shipped checkpoints."""

import json

import pytest
import torch

from contextpatch import ContextPatchError
from contextpatch.experiments.config import TaskConfig, TrainConfig, experiment_preset, model_preset
from contextpatch.experiments.convergence import step_norm_curve
from contextpatch.experiments.equivalence import measure
from contextpatch.experiments.models import load_checkpoint, shipped_checkpoint
from contextpatch.experiments.run import headline, reproduce
from contextpatch.experiments.train import train_model

HEADLINE_KEYS = {
    "equivalence": {"mean_abs_diff", "max_abs_diff"},
    "icl": {"mse_with_context", "mse_without_context"},
    "finetune": {"alignment_mean"},
    "convergence": {"attention_last_over_first", "rnn_last_over_first"},
    "thought_patch": {"test_mse_by_K"},
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    metrics = reproduce("quick", out, progress=False)
    return out, metrics


def test_quick_files_and_keys(quick):
    out, metrics = quick
    for f in ["metrics.json", "report.md", "equivalence_training_curves.png", "equivalence_per_block.png",
              "finetune.png", "convergence.png", "thought_patch_diff.png", "thought_patch_loss.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "metrics.json").read_text())
    for sec, keys in HEADLINE_KEYS.items():
        assert keys <= on_disk[sec].keys(), sec
    assert on_disk["seeds"]["experiments"] == experiment_preset("quick").seed
    assert {"single", "deep", "rnn"} <= on_disk["config"]["models"].keys()
    assert not list(out.glob("*.tmp")), "temporary files left behind"
    report = (out / "report.md").read_text()
    assert "differs from the paper" in report and "Headline" in report
    assert set(headline(metrics)) == set(HEADLINE_KEYS)


def test_quick_equivalence_bars(quick):
    _, metrics = quick
    for name, per in metrics["equivalence"]["models"].items():
        assert per["float32"]["mean_abs_diff"] <= 1e-5, name
        assert per["float64"]["mean_abs_diff"] <= 1e-12, name
        assert per["float64"]["max_abs_diff"] <= 1e-10, name
        assert per["float64"]["mse_patched"] == pytest.approx(per["float64"]["mse_with_context"], rel=1e-9)
        # control: without the patch the context-free output is far off
        assert per["float64"]["control_mean_abs_diff_unpatched"] > 1e3 * per["float32"]["mean_abs_diff"], name
    assert len(metrics["equivalence"]["models"]["deep"]["float64"]["per_block_max_abs_diff"]) == 10
    # the training history was recorded with the patched validation loss on the same curve
    h = metrics["equivalence"]["training_curves"]["single"]
    assert h["val_loss_patched"] == pytest.approx(h["val_loss"], rel=1e-4)


def test_quick_finetune_and_patch_shapes(quick):
    _, m = quick
    N = TaskConfig().n_context
    assert len(m["finetune"]["alignment_by_step_mean"]) == N
    assert all(-1 - 1e-6 <= a <= 1 + 1e-6 for a in m["finetune"]["alignment_by_step_mean"])
    assert m["finetune"]["implicit_vs_direct_max_abs_diff"] < 1e-4
    assert m["finetune"]["lr"] in experiment_preset("quick").ft_lrs
    assert len(m["convergence"]["attention"]["mean"]) == N
    assert set(m["thought_patch"]["test_mse_by_K"]) == {str(k) for k in experiment_preset("quick").tp_Ks}


def test_bad_preset_and_unwritable_out(tmp_path):
    with pytest.raises(ContextPatchError, match="unknown preset"):
        reproduce("huge", tmp_path / "x", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ContextPatchError, match="not writable"):
        reproduce("quick", blocker / "out", progress=False)


def test_resume_checks_config(tmp_path):
    tc = TrainConfig(steps=4, batch_size=8, warmup=1, eval_every=2, n_val=8, checkpoint_every=2)
    ck = train_model("single", model_preset("single", "quick"), TaskConfig(), tc, tmp_path, progress=False)
    assert ck.meta["step"] == 4 and (tmp_path / "single.state.pt").is_file()
    again = train_model("single", model_preset("single", "quick"), TaskConfig(), tc, tmp_path, resume=True,
                        progress=False)
    assert again.meta["step"] == 4
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    with pytest.raises(ContextPatchError, match="different configuration"):
        train_model("single", model_preset("single", "quick"), TaskConfig(), TrainConfig(steps=5), tmp_path,
                    resume=True, progress=False)


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    import contextpatch.experiments.train as T

    tc = TrainConfig(steps=6, batch_size=8, warmup=2, eval_every=2, n_val=8, checkpoint_every=2)
    mc = model_preset("single", "quick")
    full = train_model("single", mc, TaskConfig(), tc, tmp_path / "a", progress=False)
    calls = [0]
    orig = T.sample_prompts

    def interrupt_at_step_5(*a, **k):  # call 1 draws the validation set, calls 2.. the training batches
        calls[0] += 1
        if calls[0] == 1 + 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(T, "sample_prompts", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_model("single", mc, TaskConfig(), tc, tmp_path / "b", progress=False)
    monkeypatch.setattr(T, "sample_prompts", orig)
    assert load_checkpoint(tmp_path / "b" / "single").meta["step"] == 4
    resumed = train_model("single", mc, TaskConfig(), tc, tmp_path / "b", resume=True, progress=False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.history["val_loss"] == full.history["val_loss"]


# ------------------------------------------------------------------------------- shipped checkpoints
@pytest.fixture(scope="module")
def shipped():
    return {n: load_checkpoint(shipped_checkpoint(n)) for n in ("single", "deep", "rnn")}


def test_shipped_equivalence(shipped):
    for name, ck in shipped.items():
        r32 = measure(ck.model, 100, 0, torch.float32)
        r64 = measure(ck.model, 100, 0, torch.float64)
        assert r32["mean_abs_diff"] <= 1e-5, name
        assert r64["mean_abs_diff"] <= 1e-12, name
        assert r64["control_mean_abs_diff_unpatched"] > 1e-2, name


@torch.no_grad()
def test_shipped_single_block_learns_in_context(shipped):
    m = shipped["single"].model
    g = torch.Generator().manual_seed(99)
    from contextpatch.experiments.data import sample_prompts

    p = sample_prompts(1000, m.task.n_context, m.task.d, generator=g)
    mse = float(((m.predict(p.tokens) - p.yq) ** 2).mean())
    best_free = float((p.yq ** 2).mean())                  # ŷ = 0, the best context-free predictor (≈ d)
    assert mse < 0.2 * m.task.d and mse < 0.2 * best_free
    free = float(((m.predict_context_free(p.query) - p.yq) ** 2).mean())
    assert free > 5 * mse                                  # the context matters


def test_shipped_attention_converges(shipped):
    s = step_norm_curve(shipped["single"].model, 100, 5).mean(0)
    assert float(s[-1] / s[1]) < 0.1
    r = step_norm_curve(shipped["rnn"].model, 100, 5).mean(0)
    assert float(r[-1] / r[1]) > float(s[-1] / s[1])


def test_shipped_deep_static_thought_patch(shipped):
    """A static (query-independent) patch per layer, fitted on 25 queries, brings the 10-layer model without its
    context close to its with-context MSE; the constant-residual variant and no patch at all stay far above."""
    from contextpatch.experiments.common import test_prompts
    from contextpatch.experiments.data import query_tokens
    from contextpatch.experiments.thought_patch import _with_context_states, converged_K, fit_thought_patch

    model = shipped["deep"].model.eval()
    p = test_prompts(model, 2, seed=99)
    g = torch.Generator().manual_seed(100)
    K, mse = 25, {"affine": [], "constant": [], "context": [], "none": []}
    for c in range(2):
        xs = torch.randn(K + 100, 2, generator=g)
        ys, q = xs @ p.w[c], query_tokens(xs)
        states, out_c = _with_context_states(model, p.context[c], q)
        for kind in ("affine", "constant"):
            out = fit_thought_patch(model, states, q, K, 1e-3, residual=kind)[2]
            mse[kind].append(float(((out[K:, -1] - ys[K:]) ** 2).mean()))
        mse["context"].append(float(((out_c[K:, -1] - ys[K:]) ** 2).mean()))
        with torch.no_grad():
            mse["none"].append(float(((model(q.unsqueeze(1))[K:, 0, -1] - ys[K:]) ** 2).mean()))
    m = {k: sum(v) / len(v) for k, v in mse.items()}
    assert m["affine"] < 5 * m["context"] + 0.02, m
    assert m["none"] > 10 * m["affine"] and m["constant"] > 3 * m["affine"], m
    assert converged_K([1, 2, 3, 4], [5.0, 1.0, 0.5, 0.45]) == 3
