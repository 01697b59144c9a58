"""Static context adapters (engine/_static.py): exactness on one calibration token, query independence,
save/load, errors, the held-out evaluation and the ``compress`` CLI. Every exactness check carries a control."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from contextpatch import ContextPatchError, PatchFileError, StaticPatches, evaluate_static, fit_static
from contextpatch._patches import LowRankPatch
from contextpatch.adapters import get_adapter, tiny_model
from contextpatch.cli import app


def _ids(shape, seed):
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(ids, position_ids=pos).logits


def _with_context(model, ctx, q):
    n, T = ctx.numel(), q.numel()
    return _logits(model, torch.cat([ctx, q])[None], torch.arange(n + T)[None])[0, n:]


def _alone(model, q, n):
    return _logits(model, q[None], torch.arange(n, n + q.numel())[None])[0]


@pytest.mark.parametrize("arch,output_patch", [("gpt2", "auto"), ("gpt2", "weight"), ("llama", "auto"),
                                               ("gemma3", "auto")])
def test_one_calibration_token_is_reproduced_exactly(arch, output_patch):
    """K = T = 1, ridge 0: the least-squares fit interpolates the single key at every layer (later layers see the
    exactly reproduced state), so the adapter gives that token's with-context logits."""
    model = tiny_model(arch, dtype=torch.float64, seed=0)
    ctx, q = _ids((9,), 1), _ids((1,), 2)
    static = fit_static(model, ctx, [q], ridge=0.0, output_patch=output_patch)
    ref = _with_context(model, ctx, q)
    with static.applied(model):
        out = _alone(model, q, 9)
    control = _alone(model, q, 9)
    err, ctrl = float((out - ref).abs().max()), float((control - ref).abs().max())
    print(f"{arch}/{static.slot}: calibration token |Δ| = {err:.2e}, control {ctrl:.2e}")
    assert err <= 1e-10 and ctrl > 1e-2
    ev = evaluate_static(model, static, ctx, [q])
    assert ev["max_abs_diff"] <= 1e-10 and ev["control_max_abs_diff"] > 1e-2 and ev["top1_agreement"] == 1.0


@pytest.mark.parametrize("arch,output_patch,floor", [("llama", "auto", 1e-5), ("gpt2", "weight", 1e-10)])
def test_weight_slot_interpolates_every_calibration_token_of_ragged_queries(arch, output_patch, floor):
    """Weight slot, ridge 0, 4 calibration tokens in queries of lengths 1 and 3 (right-padded inside): 4 linearly
    independent keys are all interpolated, so all four tokens reproduce the targets of the packed with-context pass
    (evaluate_static's reference) exactly; padding is ignored. Against separate per-query passes Llama keeps the
    packed-vs-separate floor of HF's float32 islands (softmax/RMSNorm/RoPE, ~1e-6; see test_shared.TOL64)."""
    model = tiny_model(arch, dtype=torch.float64, seed=1)
    ctx, qa, qb = _ids((6,), 3), _ids((1,), 4), _ids((3,), 5)
    static = fit_static(model, ctx, [qa, qb], ridge=0.0, output_patch=output_patch)
    assert static.meta.options["num_calibration_tokens"] == 4
    ev = evaluate_static(model, static, ctx, [qa, qb])
    assert ev["max_abs_diff"] <= 1e-10 and ev["control_max_abs_diff"] > 1e-2
    worst = control = 0.0
    for q in (qa, qb):
        ref = _with_context(model, ctx, q)
        with static.applied(model):
            worst = max(worst, float((_alone(model, q, 6) - ref).abs().max()))
        control = max(control, float((_alone(model, q, 6) - ref).abs().max()))
    assert worst <= floor and control > 1e-2


def test_ridge_convention_shrinks_one_key_by_one_over_one_plus_ridge():
    """λ = ridge · mean ‖z‖²: for one key the layer-0 input patch is the exact token patch times 1/(1+ridge)."""
    model = tiny_model("llama", dtype=torch.float64, seed=0)
    ctx, q = _ids((5,), 1), _ids((1,), 2)
    exact = fit_static(model, ctx, [q], ridge=0.0).layer_patches(0)["mlp.up_proj"].dense()
    shrunk = fit_static(model, ctx, [q], ridge=0.5).layer_patches(0)["mlp.up_proj"].dense()
    assert torch.allclose(shrunk, exact / 1.5, atol=1e-12, rtol=0)
    assert float(exact.norm()) > 1e-3


def test_adapter_is_query_independent_and_leaves_weights_untouched():
    model = tiny_model("llama", dtype=torch.float64, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    static = fit_static(model, _ids((7,), 1), _ids((4, 2), 2), ridge=1e-3)
    for P in static.layers:                                   # no token dimension anywhere
        assert all(v.dim() in (1, 2) for v in P.tensors().values())
    x = _ids((3, 5), 9)
    with static.applied(model):
        for shape in [(1, 1), (1, 6), (3, 5), (5, 2)]:
            ids = _ids(shape, sum(shape))
            out = _logits(model, ids, None)
            assert out.shape == shape + (100,) and bool(out.isfinite().all())
        batch = _logits(model, x, None)
        rows = torch.cat([_logits(model, x[i:i + 1], None) for i in range(3)])
    assert torch.allclose(batch, rows, atol=1e-12, rtol=0)   # the same patch for every row, whatever the batch
    plain = _logits(model, x, None)
    assert float((plain - batch).abs().max()) > 1e-2         # control: the adapter changes the output
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_rank_truncation_is_the_best_low_rank_approximation():
    model = tiny_model("gpt2", dtype=torch.float64, seed=0)
    ctx, cal = _ids((6,), 1), _ids((6, 3), 2)
    full = fit_static(model, ctx, cal, ridge=1e-3)
    low = fit_static(model, ctx, cal, ridge=1e-3, rank=2)
    assert all(r["rank_in"] <= 2 for r in low.summary()) and full.summary()[0]["rank_in"] > 2
    # layer 0 sees identical keys in both fits: the truncated patch is the rank-2 SVD truncation of the full one
    dense = full.layer_patches(0)["mlp.c_fc"].dense()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    best = U[:, :2] * S[:2] @ Vh[:2]
    assert torch.allclose(low.layer_patches(0)["mlp.c_fc"].dense(), best, atol=1e-10, rtol=0)
    g = torch.Generator().manual_seed(0)
    p = LowRankPatch(torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64,
                                                                                      generator=g))
    assert p.compress(max_rank=3).rank == 3 and p.compress().rank == 4
    assert low.nbytes() < full.nbytes()


def test_save_load_round_trip_and_wrong_model(tmp_path):
    model = tiny_model("gemma3", dtype=torch.float32, seed=0)
    static = fit_static(model, _ids((5,), 1), _ids((3, 2), 2), seed=7)
    static.save(tmp_path / "a")
    back = StaticPatches.load(tmp_path / "a")
    assert back.meta == static.meta and back.meta.options["seed"] == 7
    for P, Q in zip(static.layers, back.layers, strict=True):
        P, Q = P.tensors(), Q.tensors()
        assert P.keys() == Q.keys() and all(torch.equal(P[k], Q[k]) for k in P)
    x = _ids((2, 3), 5)
    with static.applied(model):
        a = _logits(model, x, None)
    with back.applied(model):
        b = _logits(model, x, None)
    assert torch.equal(a, b)
    row = back.summary()[0]
    assert {"layer", "dW_in", "dW_in_rel", "rank_in", "out", "d_out", "rank_out"} <= set(row) and row["out"] == "scale"
    # other weights, other family
    with pytest.raises(PatchFileError, match="different weights"):
        with back.applied(tiny_model("gemma3", dtype=torch.float32, seed=1)):
            pass
    with pytest.raises(PatchFileError, match="different model"):
        with back.applied(tiny_model("llama", dtype=torch.float32, seed=0)):
            pass
    # check_weights=False skips only the fingerprint (the caller's promise); another config is still refused
    other = tiny_model("gemma3", dtype=torch.float32, seed=1)
    with back.applied(other, check_weights=False):
        c = _logits(other, x, None)
    assert torch.isfinite(c).all() and not torch.equal(c, a)
    with pytest.raises(PatchFileError, match="different model"):
        with back.applied(tiny_model("llama", dtype=torch.float32, seed=0), check_weights=False):
            pass
    # corrupted tensor file, broken metadata, missing file
    f = tmp_path / "a" / "static.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PatchFileError, match="corrupted"):
        StaticPatches.load(tmp_path / "a")
    static.save(tmp_path / "b")
    (tmp_path / "b" / "static.json").write_text("{not json")
    with pytest.raises(PatchFileError):
        StaticPatches.load(tmp_path / "b")
    with pytest.raises(PatchFileError, match="missing"):
        StaticPatches.load(tmp_path / "nothing")


def test_bad_input_raises_clear_errors():
    model = tiny_model("llama", dtype=torch.float32, seed=0)
    ctx = _ids((4,), 1)
    with pytest.raises(ContextPatchError, match="no calibration queries"):
        fit_static(model, ctx, [])
    with pytest.raises(ContextPatchError, match="non-empty"):
        fit_static(model, ctx, [torch.tensor([], dtype=torch.long)])
    with pytest.raises(ContextPatchError, match="ridge"):
        fit_static(model, ctx, [ctx], ridge=-1.0)
    with pytest.raises(ContextPatchError, match="rank"):
        fit_static(model, ctx, [ctx], rank=0)
    with pytest.raises(ContextPatchError, match="vocab|\\[0, 100\\)"):
        fit_static(model, ctx, [torch.tensor([5, 100])])
    with pytest.raises(ContextPatchError, match="MoE"):
        fit_static(tiny_model("mixtral", dtype=torch.float32, seed=0), ctx, [ctx])
    with pytest.raises(ContextPatchError, match="causal"):
        fit_static(tiny_model("bert", dtype=torch.float32, seed=0), ctx, [ctx])


def test_evaluate_static_held_out_numbers():
    """Held-out queries on a tiny random model: the numbers are measured and printed, never assumed better than the
    control (random weights have no reason to generalise; see docs/static.md)."""
    model = tiny_model("gpt2", dtype=torch.float32, seed=0)
    ctx, held = _ids((12,), 1), _ids((16, 3), 2)
    keys = {"mean_abs_diff", "max_abs_diff", "kl", "top1_agreement", "control_mean_abs_diff",
            "control_max_abs_diff", "control_kl", "control_top1_agreement", "num_queries", "num_tokens",
            "same_context"}
    for K in (1, 16):
        ev = evaluate_static(model, fit_static(model, ctx, _ids((K, 3), 100 + K)), ctx, held)
        assert keys <= set(ev) and ev["num_tokens"] == 48 and ev["same_context"] is True
        assert all(v == v and abs(v) < float("inf") for k, v in ev.items() if isinstance(v, float))
        print(f"gpt2 K={K}: mean |Δlogit| {ev['mean_abs_diff']:.3f} (control {ev['control_mean_abs_diff']:.3f}), "
              f"KL {ev['kl']:.3f} (control {ev['control_kl']:.3f}), top-1 {ev['top1_agreement']:.2f} "
              f"(control {ev['control_top1_agreement']:.2f})")
    assert ev["control_mean_abs_diff"] > 1e-2


runner = CliRunner()


def test_cli_compress_random_json_and_reload(tmp_path):
    out = tmp_path / "adapter"
    res = runner.invoke(app, ["compress", "--arch", "gpt2", "--random", "--calibration", "8", "--out", str(out),
                              "--json", "--seed", "3"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["calibration_queries"] == 8 and d["seed"] == 3 and d["out"] == str(out)
    assert d["control_mean_abs_diff"] > 0 and d["kl"] >= 0 and len(d["layers"]) == 3
    back = StaticPatches.load(out)
    assert back.meta.options["seed"] == 3 and back.meta.options["num_calibration_queries"] == 8
    assert get_adapter(tiny_model("gpt2", dtype=torch.float32, seed=3)).name == back.meta.family


def test_cli_compress_queries_file_table_and_errors(tmp_path):
    qf = tmp_path / "q.txt"
    qf.write_text("5 6 7\n8,9\n10 11 12 13\n14\n")
    res = runner.invoke(app, ["compress", "--arch", "llama", "--random", "--context", "3,4,5,6", "--queries", str(qf),
                              "--calibration", "2", "--rank", "1"])
    assert res.exit_code == 0, res.output
    assert "held-out: 2 queries, 5 tokens" in res.stdout and "no context" in res.stdout
    res = runner.invoke(app, ["compress", "--arch", "mixtral", "--random"])
    assert res.exit_code == 2 and "MoE" in res.output
    res = runner.invoke(app, ["compress", "--arch", "llama", "--random", "--queries", str(qf), "--calibration", "9"])
    assert res.exit_code == 2 and "at least --calibration=9" in res.output
    res = runner.invoke(app, ["compress", "--help"])
    assert res.exit_code == 0 and "--calibration" in res.stdout


def test_cli_compress_attention_and_reduced_rank(tmp_path):
    out = tmp_path / "adapter"
    res = runner.invoke(app, ["compress", "--arch", "llama", "--random", "--calibration", "8", "--rank", "2",
                              "--attention", "--rank-method", "rrr", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    back = StaticPatches.load(out)
    assert back.meta.options["attention"] and back.meta.options["rank_method"] == "rrr"
    assert back.layer_patches(0)["self_attn.o_proj"].rank <= 2
    res = runner.invoke(app, ["compress", "--arch", "llama", "--random", "--rank", "2", "--rank-method", "qr"])
    assert res.exit_code == 2 and "rank_method" in res.output


@pytest.mark.parametrize("arch,output_patch", [("llama", "auto"), ("gpt2", "weight")])
def test_drop_in_mode_keeps_bos_and_runs_from_position_zero(arch, output_patch):
    """keep_prefix=1, renumber_positions=True: the adapter runs on [BOS, query] at positions 0.., as a server would
    without the context. K = T = 1, ridge 0: two keys per layer (BOS, the query token) are interpolated, so BOS
    is unchanged and the query token gets its with-context logits (query at position n after the context)."""
    model = tiny_model(arch, dtype=torch.float64, seed=0)
    ctx, q = torch.cat([torch.tensor([1]), _ids((8,), 1)]), _ids((1,), 2)          # ctx[0] is BOS
    static = fit_static(model, ctx, [q], ridge=0.0, output_patch=output_patch, keep_prefix=1,
                        renumber_positions=True)
    ref = _with_context(model, ctx, q)                                             # plain forward, q at position 9
    x, pos = torch.cat([ctx[:1], q])[None], torch.arange(2)[None]
    with static.applied(model):
        out = _logits(model, x, pos)[0]
    plain = _logits(model, x, pos)[0]
    assert float((out[1:] - ref).abs().max()) <= 1e-10 and float((plain[1:] - ref).abs().max()) > 1e-2
    assert float((out[:1] - plain[:1]).abs().max()) <= 1e-10                        # BOS itself is unchanged
    ev = evaluate_static(model, static, ctx, [q])
    assert ev["keep_prefix"] == 1 and ev["renumber_positions"] and ev["max_abs_diff"] <= 1e-10
    fitted_positions = evaluate_static(model, static, ctx, [q], keep_prefix=0, renumber_positions=False)
    assert fitted_positions["max_abs_diff"] > 1e-6                                 # a different input: reported apart
    with pytest.raises(ContextPatchError, match="keep_prefix"):
        fit_static(model, ctx, [q], keep_prefix=9)


def test_encoder_prefix_is_reproduced_exactly_on_its_calibration_sentence():
    """Bidirectional encoder (BERT): a prefix inserted after [CLS] changes every token. One calibration sentence,
    weight slot, ridge 0: every kept token's key is interpolated, so the adapter on [CLS] s [SEP] at positions
    0.. gives the with-prefix final states of all those tokens (plain forward pass with the prefix)."""
    from contextpatch.engine import fit_static_encoder

    model = tiny_model("bert", dtype=torch.float64, seed=0)
    prefix, s = _ids((4,), 1), torch.cat([torch.tensor([1]), _ids((5,), 2), torch.tensor([2])])
    static = fit_static_encoder(model, prefix, [s], output_patch="weight", ridge=0.0)
    with torch.no_grad():
        full = torch.cat([s[:1], prefix, s[1:]])[None]
        ref = model(full).last_hidden_state[0, [0] + list(range(5, 11))]
        plain = model(s[None]).last_hidden_state[0]
        with static.applied(model):
            out = model(s[None]).last_hidden_state[0]
    assert float((out - ref).abs().max()) <= 1e-10 and float((plain - ref).abs().max()) > 1e-2
    with pytest.raises(ContextPatchError, match="causal"):
        fit_static_encoder(tiny_model("llama"), prefix, [s])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_applied_hooks_equal_the_merged_weights_and_follow_edits_of_the_factors(dtype):
    """The hooks' fast path (factors cast once, cached) computes W x + U (Vᵀ x) like the merged weights, on every
    call; an in-place edit of a factor (zeroing U of every matrix) is picked up by the next call."""
    model = tiny_model("llama", dtype=dtype, seed=0)
    static = fit_static(model, _ids((9,), 1), [_ids((4,), 2), _ids((5,), 3)], rank=4)
    x = _ids((2, 6), 4)
    pos = torch.arange(6).expand(2, 6)
    merged = static.merge(model)
    plain = _logits(model, x, pos)
    with static.applied(model):
        first, second = _logits(model, x, pos), _logits(model, x, pos)
        tol = 1e-12 if dtype == torch.float64 else 1e-5 * float(first.abs().max())
        assert float((first - _logits(merged, x, pos)).abs().max()) <= tol
        assert torch.equal(first, second) and float((first - plain).abs().max()) > 1e-2      # control
        for lp in static.layers:
            for p in [*lp.inputs.values(), lp.out_weight]:
                if isinstance(p, LowRankPatch):
                    p.U.mul_(0)
        assert float((_logits(model, x, pos) - plain).abs().max()) <= 1e-12              # the edit is seen
