"""The closed-form extensions of static adapters (issue 10 §2): the attention-output slot (``attention=True``) and
reduced-rank ridge regression (``rank_method="rrr"``). Each is checked against an independent computation from
plain forward passes (or a generic optimiser), with a control showing the check can fail; the new slot's file
format and peft / merged exports are checked too."""

from __future__ import annotations

import pytest
import torch

from contextpatch import ContextPatchError, PatchFileError, StaticPatches, evaluate_static, fit_static
from contextpatch.adapters import tiny_model
from contextpatch.engine._attention_slot import ATTENTION_OUTPUT
from contextpatch.engine._static_fit import _ridge

PATH = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj"}
#: float64 models: GPT-2 runs in float64 throughout; HF computes Llama's RMSNorm and eager softmax in float32, and
#: the fit reads the with-context states in one packed pass, not the separate passes of the reference here
TOL = {"llama": 1e-7, "gpt2": 1e-10}


def _ids(shape, seed):
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


def _layer0_attention(model, arch, ids, pos):
    """Plain pass: (input of the layer-0 attention output projection, residual right after attention), all tokens."""
    blk = model.model.layers[0] if arch == "llama" else model.transformer.h[0]
    proj = blk.get_submodule(PATH[arch])
    norm = blk.post_attention_layernorm if arch == "llama" else blk.ln_2
    box = {}
    h1 = proj.register_forward_hook(lambda m, a, o: box.__setitem__("a", a[0][0]))
    h2 = norm.register_forward_pre_hook(lambda m, a: box.__setitem__("r", a[0][0]))
    try:
        with torch.no_grad():
            model(ids[None], position_ids=pos[None])
    finally:
        h1.remove()
        h2.remove()
    return box["a"], box["r"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_slot_layer0_is_the_ridge_solution_of_plain_pass_states(arch):
    """Layer 0 sees no upstream patch, so its ΔW_o must be the ridge fit of (a, r_C − r) read in plain passes:
    ΔW = D Aᵀ (A Aᵀ + λI)⁻¹... written in the primal form (AᵀA + λI)⁻¹AᵀD, λ = ridge · mean ‖a‖²."""
    model = tiny_model(arch, dtype=torch.float64, seed=0)
    ctx, qs = _ids((7,), 1), [_ids((3,), 2), _ids((2,), 3)]
    n, ridge = ctx.numel(), 0.3
    static = fit_static(model, ctx, qs, ridge=ridge, attention=True)
    A, D = [], []
    for q in qs:
        a, r = _layer0_attention(model, arch, q, torch.arange(n, n + q.numel()))
        _, rc = _layer0_attention(model, arch, torch.cat([ctx, q]), torch.arange(n + q.numel()))
        A.append(a)
        D.append(rc[n:] - r)
    A, D = torch.cat(A), torch.cat(D)
    lam = ridge * float(A.pow(2).sum(-1).mean())
    want = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ D).T
    got = static.layer_patches(0)[PATH[arch]].dense()
    assert torch.allclose(got, want, atol=TOL[arch], rtol=0), float((got - want).abs().max())
    other = fit_static(model, _ids((7,), 9), qs, ridge=ridge, attention=True).layer_patches(0)[PATH[arch]].dense()
    assert float((other - want).abs().max()) > 1e-3                      # control: another context, another patch
    assert static.summary()[0]["dW_attn"] == pytest.approx(float(got.norm()), rel=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_slot_reproduces_one_calibration_token_exactly(arch):
    """ridge 0, one token: every layer's ΔW_o interpolates its key, so the residual after attention is already
    the with-context one; the logits match a plain forward pass of [context, query] (float64)."""
    model = tiny_model(arch, dtype=torch.float64, seed=1)
    ctx, q = _ids((9,), 4), _ids((1,), 5)
    static = fit_static(model, ctx, [q], ridge=0.0, attention=True, output_patch="weight")
    with torch.no_grad():
        ref = model(torch.cat([ctx, q])[None]).logits[0, -1]
        with static.applied(model):
            out = model(q[None], position_ids=torch.tensor([[9]])).logits[0, -1]
        control = model(q[None], position_ids=torch.tensor([[9]])).logits[0, -1]
    assert float((out - ref).abs().max()) <= 1e-10 and float((control - ref).abs().max()) > 1e-2


def test_attention_slot_helps_held_out_on_a_random_model_and_is_opt_in():
    """Not a bar, a sanity check: on 32 calibration tokens the extra slot lowers the calibration KL, and the
    default fit has no attention patch (its behaviour is unchanged)."""
    model = tiny_model("llama", dtype=torch.float64, seed=2)
    ctx, cal = _ids((8,), 6), _ids((8, 4), 7)
    plain = fit_static(model, ctx, cal, ridge=1e-2)
    attn = fit_static(model, ctx, cal, ridge=1e-2, attention=True)
    assert all(lp.attn_out is None for lp in plain.layers) and "attention" not in plain.meta.options
    assert evaluate_static(model, attn, ctx, cal)["kl"] < evaluate_static(model, plain, ctx, cal)["kl"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_slot_file_format_and_exports(tmp_path, arch):
    """Save/load keeps the slot; merge (float64, ≤ 1e-10) and a peft folder (float32, ≤ 1e-5; GPT-2: Conv1D with
    fan_in_fan_out, bias slot next to it) give the hook-applied adapter's logits; inconsistent files are refused."""
    peft = pytest.importorskip("peft")
    model = tiny_model(arch, dtype=torch.float64, seed=3)
    ctx, cal, x = _ids((8,), 8), _ids((6, 3), 9), _ids((2, 5), 10)
    static = fit_static(model, ctx, cal, ridge=1e-2, rank=3, attention=True)
    with torch.no_grad(), static.applied(model):
        ref = model(x).logits
    with torch.no_grad():
        plain = model(x).logits
    assert float((plain - ref).abs().max()) > 1e-2
    back = StaticPatches.load(static.save(tmp_path / "a"))             # round trip keeps the slot
    with torch.no_grad(), back.applied(model):
        assert torch.equal(model(x).logits, ref)
    merged = static.merge(model)                                         # W_o ← W_o + ΔW_o (and the MLP matrices)
    with torch.no_grad():
        assert float((merged(x).logits - ref).abs().max()) <= 1e-10
    m32 = tiny_model(arch, dtype=torch.float32, seed=3)
    s32 = fit_static(m32, ctx, cal, ridge=0.1, rank=3, attention=True)
    with torch.no_grad(), s32.applied(m32):
        ref32 = m32(x).logits
    s32.to_peft(m32, tmp_path / "peft")
    base = tiny_model(arch, dtype=torch.float32, seed=3)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert any(f"{PATH[arch]}.lora_A" in k for k in pm.state_dict())
    with torch.no_grad():
        err = float((pm(input_ids=x).logits - ref32).abs().max())
        assert err <= 1e-5, err
    # a file whose metadata says "attention" but whose layers lack the patch is refused
    import dataclasses

    meta = dataclasses.replace(static.meta, options={k: v for k, v in static.meta.options.items()
                                                     if k not in ("attention", "attention_module")})
    StaticPatches(static.layers, meta).save(tmp_path / "bad")
    with pytest.raises(PatchFileError, match="attention"):
        StaticPatches.load(tmp_path / "bad")


def test_attention_slot_bad_input_is_one_clear_error():
    gemma = tiny_model("gemma3", dtype=torch.float64, seed=0)
    assert "gemma3" not in ATTENTION_OUTPUT
    with pytest.raises(ContextPatchError, match="attention-output slot"):
        fit_static(gemma, _ids((5,), 1), [_ids((2,), 2)], attention=True)
    llama = tiny_model("llama", dtype=torch.float64, seed=0)
    with pytest.raises(ContextPatchError, match="rank_method"):
        fit_static(llama, _ids((5,), 1), [_ids((2,), 2)], rank=2, rank_method="pca")


def _objective(W, A, T, lam):
    return float((A @ W.T - T).pow(2).sum() + lam * W.pow(2).sum())


@pytest.mark.parametrize("lam_rel,N", [(0.0, 40), (0.5, 40), (0.1, 10)])
def test_reduced_rank_ridge_is_the_best_rank_r_fit_of_the_ridge_objective(lam_rel, N):
    """RRR minimises ‖A ΔWᵀ − T‖² + λ‖ΔW‖² over rank ≤ r: no generic optimiser (L-BFGS on U Vᵀ, 4 random
    starts) finds a lower value; the SVD truncation of the full solution (the default) is strictly worse here
    (the control), and with r = the full rank both equal the unconstrained ridge solution."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r = 12, 9, 2
    A = torch.randn(N, d_in, dtype=torch.float64, generator=g) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    T = A @ torch.randn(d_in, d_out, dtype=torch.float64, generator=g) + 0.3 * torch.randn(N, d_out,
                                                                                           dtype=torch.float64,
                                                                                           generator=g)
    lam = lam_rel * float(A.pow(2).sum(-1).mean())
    rrr = _ridge(A, T, lam_rel, r, "rrr").dense()
    svd = _ridge(A, T, lam_rel, r, "svd").dense()
    assert torch.linalg.matrix_rank(rrr) == r
    best = float("inf")
    for s in range(4):
        gs = torch.Generator().manual_seed(s + 1)
        U = torch.randn(d_out, r, dtype=torch.float64, generator=gs).requires_grad_()
        V = torch.randn(d_in, r, dtype=torch.float64, generator=gs).requires_grad_()
        opt = torch.optim.LBFGS([U, V], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure(U=U, V=V, opt=opt):
            opt.zero_grad()
            loss = ((A @ V @ U.T - T).pow(2).sum() + lam * (U @ V.T).pow(2).sum())
            loss.backward()
            return loss
        opt.step(closure)
        best = min(best, _objective((U @ V.T).detach(), A, T, lam))
    j_rrr, j_svd = _objective(rrr, A, T, lam), _objective(svd, A, T, lam)
    assert j_rrr <= best * (1 + 1e-9) + 1e-9, (j_rrr, best)
    assert j_svd > j_rrr * (1 + 1e-3), (j_svd, j_rrr)
    full_rank = min(N, d_in, d_out)
    assert torch.allclose(_ridge(A, T, lam_rel, full_rank, "rrr").dense(), _ridge(A, T, lam_rel, None).dense(),
                          atol=1e-9, rtol=0)


def test_rrr_in_fit_static_keeps_rank_and_beats_svd_on_calibration():
    model = tiny_model("gpt2", dtype=torch.float64, seed=4)
    ctx, cal = _ids((6,), 11), _ids((10, 3), 12)
    svd = fit_static(model, ctx, cal, ridge=1e-2, rank=1, output_patch="weight")
    rrr = fit_static(model, ctx, cal, ridge=1e-2, rank=1, output_patch="weight", rank_method="rrr")
    assert all(r["rank_in"] == 1 and r["rank_out"] == 1 for r in rrr.summary())
    assert rrr.meta.options["rank_method"] == "rrr" and "rank_method" not in svd.meta.options
    assert evaluate_static(model, rrr, ctx, cal)["kl"] < evaluate_static(model, svd, ctx, cal)["kl"]
