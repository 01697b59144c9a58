"""Pure-math properties of the token patch, the patch types and the implicit dynamics (float64)."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import contextpatch as cp
from contextpatch import _patches, theory
from contextpatch.blocks import MLP, ContextualBlock, context_outputs, make_layer, prefix_outputs, suffix_outputs

f64 = torch.float64


def rand(*shape, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=f64)


# ------------------------------------------------------------------------------------ token patch
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), batch=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_token_patch_maps_a_to_a_plus_delta(d_in, d_out, batch, seed):
    W, delta, a = rand(d_out, d_in, seed=seed), rand(batch, d_in), rand(batch, d_in)
    p = cp.token_patch(W, delta, a)
    lhs = ((W + p.dense()) @ a.unsqueeze(-1)).squeeze(-1)
    rhs = (W @ (a + delta).unsqueeze(-1)).squeeze(-1)
    assert (lhs - rhs).abs().max() <= 1e-12 * rhs.abs().max().clamp_min(1)
    # control: without the patch the pre-activations W a differ from W (a + δ), by W δ. Where ‖W δ‖ is tiny
    # next to ‖W (a + δ)‖ (e.g. d_out = 1 and W ⟂ δ by chance) the control says nothing: skip those draws.
    norm = torch.linalg.vector_norm
    assume(bool((norm(delta @ W.T, dim=-1) > 1e-6 * norm(rhs, dim=-1)).all()))
    unpatched = (W @ a.unsqueeze(-1)).squeeze(-1)
    assert bool((norm(unpatched - rhs, dim=-1) > 0.5e-6 * norm(rhs, dim=-1)).all())
    assert p.rank == 1 and tuple(p.shape) == (batch, d_out, d_in)
    # factored application equals the dense matrix
    x = rand(batch, d_in)
    assert torch.allclose(p.apply(x), (p.dense() @ x.unsqueeze(-1)).squeeze(-1), atol=1e-12)


@given(d_in=st.integers(2, 16), d_out=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_token_patch_is_minimal_norm(d_in, d_out, seed):
    """Among all E with E a = W δ, ΔW = (Wδ)aᵀ/‖a‖² has the least Frobenius norm."""
    W, delta, a = rand(d_out, d_in, seed=seed), rand(d_in), rand(d_in)
    E = cp.token_patch(W, delta, a).dense()
    P_perp = torch.eye(d_in, dtype=f64) - torch.outer(a, a) / (a @ a)
    for _ in range(5):
        N = rand(d_out, d_in) @ P_perp                   # N a = 0
        assert torch.allclose((E + N) @ a, W @ delta, atol=1e-10)
        # N ⟂ E (Frobenius), so ‖E + N‖² = ‖E‖² + ‖N‖² ≥ ‖E‖², with equality only for N = 0
        nE, nN, nEN = (torch.linalg.matrix_norm(M) for M in (E, N, E + N))
        assert torch.isclose(nEN**2, nE**2 + nN**2, rtol=1e-8, atol=0)


def test_bias_and_residual_forms():
    torch.manual_seed(0)
    mlp = MLP(d_in=5, d_hidden=7).double()
    a, delta = rand(3, 5), rand(3, 5)
    db = theory.bias_patch(mlp.W, delta)
    pre_bias = mlp.fc(a) + db.delta
    assert torch.allclose(pre_bias, mlp.fc(a + delta), atol=1e-13)
    assert not torch.allclose(mlp.fc(a), mlp.fc(a + delta), atol=1e-2)  # control
    r = theory.residual_patch(delta)
    assert torch.equal(r.apply(a), a + delta)
    assert torch.allclose(db.norm(), torch.linalg.vector_norm(delta @ mlp.W.T, dim=-1))


def test_output_weight_and_scale_patches():
    torch.manual_seed(1)
    W, g, delta = rand(6, 4), rand(4), rand(6)
    p = theory.output_weight_patch(delta, g)
    assert torch.allclose((W + p.dense()) @ g, W @ g + delta, atol=1e-13)
    s, u = rand(6), rand(6)
    sp = theory.scale_patch(delta, u)
    assert torch.allclose((s + sp.delta) * u, s * u + delta, atol=1e-12)
    with pytest.raises(cp.DegenerateNormError, match="u_j"):
        theory.scale_patch(delta, torch.zeros(6, dtype=f64))


# ----------------------------------------------------------------------------------- bad input
def test_degenerate_norm_raises_not_nan():
    W, delta = rand(3, 4, seed=9), rand(4)
    with pytest.raises(cp.DegenerateNormError, match="tolerance"):
        cp.token_patch(W, delta, torch.zeros(4, dtype=f64))
    with pytest.raises(cp.DegenerateNormError):
        cp.token_patch(W, delta, torch.full((4,), 1e-14, dtype=f64))
    with pytest.raises(cp.DegenerateNormError):
        cp.token_patch(W, delta, torch.full((4,), float("nan"), dtype=f64))
    # a custom tolerance accepts small (but non-zero) norms, with a finite result
    p = cp.token_patch(W, delta, torch.full((4,), 1e-14, dtype=f64), tol=0.0)
    assert torch.isfinite(p.dense()).all()


def test_shape_errors_are_clear():
    W = rand(3, 4)
    with pytest.raises(cp.ContextPatchError, match="last dimension 4"):
        cp.token_patch(W, rand(5), rand(4))
    with pytest.raises(cp.ContextPatchError, match="matrix"):
        cp.token_patch(rand(4), rand(4), rand(4))
    with pytest.raises(cp.ContextPatchError, match="share K"):
        theory.static_patch(rand(3, 4), rand(2, 5))
    with pytest.raises(cp.ContextPatchError, match="at least 2 rows"):
        theory.gd_dynamics(W, rand(1, 4))
    with pytest.raises(cp.ContextPatchError, match="disagree"):
        cp.LowRankPatch(rand(3, 1), rand(4, 2))


# ---------------------------------------------------------------------------------- patch types
def test_low_rank_algebra_without_dense():
    torch.manual_seed(2)
    p = cp.LowRankPatch(rand(4, 6, 2), rand(4, 5, 2))
    q = cp.LowRankPatch(rand(4, 6, 3), rand(4, 5, 3))
    D, E = p.dense(), q.dense()
    assert torch.allclose(p.norm(), torch.linalg.matrix_norm(D))
    assert torch.allclose(p.inner(q), (D * E).sum((-1, -2)))
    assert torch.allclose((p + q).dense(), D + E) and (p + q).rank == 5
    assert torch.allclose((p - q).dense(), D - E)
    assert torch.allclose((2.5 * p).dense(), 2.5 * D)
    assert torch.allclose(p.sum(0).dense(), D.sum(0)) and p.sum(0).rank == 8
    st_ = _patches.stack_patches([p[0], p[1]])
    assert torch.equal(st_.dense(), D[:2])
    assert torch.allclose(_patches.sum_patches([p, q]).dense(), D + E)
    assert p.nbytes() < p.dense_nbytes() * 2
    # rank-1 patches sharing a right factor compress back to rank 1
    v = rand(5)
    shared = cp.LowRankPatch.outer(rand(7, 6), v.expand(7, 5)).sum(0)
    c = shared.compress()
    assert c.rank == 1 and torch.allclose(c.dense(), shared.dense(), atol=1e-12)
    with pytest.raises(cp.ContextPatchError, match="equal ranks"):
        _patches.stack_patches([p, q])


# ------------------------------------------------------------------------------------ dynamics
def _block(kind, d=6, seed=0):
    torch.manual_seed(seed)
    return ContextualBlock(layer=make_layer(kind, d_model=d, n_heads=2), mlp=MLP(d_in=d, d_hidden=10)).double()


@pytest.mark.parametrize("kind", ["softmax", "linear", "rnn"])
def test_gd_dynamics_scheme_a(kind):
    block = _block(kind)
    C, x = rand(9, 6, seed=3), rand(6)
    W = block.mlp.W.detach()
    rows = prefix_outputs(block.layer, C, x).detach()
    dyn = theory.gd_dynamics(W, rows)
    n = C.shape[0]
    # after n steps: the full-context patch
    full = cp.token_patch(W, rows[-1] - rows[0], rows[0])
    assert torch.allclose(dyn.patches[n].dense(), full.dense(), atol=1e-13)
    for i in range(n):
        # each step is one GD step on L_i(W) = trace(Δ_iᵀ W), with h = 1/‖A(x)‖²
        Wi = (W + dyn.patches[i].dense()).requires_grad_(True)
        (grad,) = torch.autograd.grad(theory.linear_loss(Wi, dyn.gradients[i]), Wi)
        W_next = Wi.detach() - dyn.lr * grad
        assert torch.allclose(W_next, W + dyn.patches[i + 1].dense(), atol=1e-13)
        assert torch.allclose(dyn.step(i).dense(), -dyn.lr * grad, atol=1e-13)
        assert torch.isclose(dyn.step_norms[i], torch.linalg.matrix_norm(dyn.step(i).dense()))
        # and T_{W_i}(x) = T_W(c_1..c_i, x): the prefix patch is exact
        with torch.no_grad():
            ref = block(torch.cat([C[:i], x[None]]))[-1]
            got = block.mlp(rows[0], patch=dyn.patches[i])
        assert torch.allclose(ref, got, atol=1e-12)
    assert float(dyn.step_norms.max()) > 1e-3  # control: the steps are not trivially zero


@pytest.mark.parametrize("kind", ["softmax", "rnn"])
def test_product_dynamics_scheme_b(kind):
    block = _block(kind, seed=1)
    C, x = rand(7, 6, seed=4), rand(6)
    W = block.mlp.W.detach()
    rows = suffix_outputs(block.layer, C, x).detach()
    dyn = theory.product_dynamics(W, rows)
    n = C.shape[0]
    # the dense product W Π (I + h_i δ_i a_iᵀ)
    Wn = W.clone()
    for i in range(1, n + 1):
        a_i, d_i = rows[i], rows[i - 1] - rows[i]
        Wn = Wn @ (torch.eye(6, dtype=f64) + torch.outer(d_i, a_i) / (a_i @ a_i))
        # gradient form: W_i = W_{i-1} − h_i Δ_i
    assert torch.allclose(W + dyn.patch.dense(), Wn, atol=1e-12)
    g1 = dyn.gradient(1).dense()
    assert torch.allclose(W - dyn.lrs[0] * g1, W + dyn.steps[0].dense(), atol=1e-13)
    with torch.no_grad():
        ref = block(torch.cat([C, x[None]]))[-1]
        got = block.mlp(rows[-1], patch=dyn.patch)
        control = block.mlp(rows[-1])
    assert torch.allclose(ref, got, atol=1e-12)
    assert (ref - control).abs().max() > 1e-2
    # both are exact, but the product is not the minimal-norm patch
    minimal = cp.token_patch(W, rows[0] - rows[-1], rows[-1])
    assert float(minimal.norm()) <= float(dyn.patch.norm()) + 1e-12


def test_linear_attention_example():
    """v4 Example 2.5: ΔW = W Δ(Y) P_x equals the general token patch for linear attention."""
    block = _block("linear", seed=5)
    C, x = rand(8, 6, seed=6), rand(6)
    Y = [1, 4, 6]
    with torch.no_grad():
        full, reduced = context_outputs(block.layer, C, x, remove=Y)
        general = cp.token_patch(block.mlp.W, full - reduced, reduced)
        values, keys, q = block.layer.kv_terms(C[Y], x)
        special = theory.linear_attention_patch(block.mlp.W, values, keys, q, reduced)
    assert torch.allclose(general.dense(), special.dense(), atol=1e-12)
    assert general.norm() > 1e-3


def test_static_patch_least_squares():
    torch.manual_seed(7)
    d_in, d_out = 5, 4
    true = rand(d_out, d_in)
    keys = rand(20, d_in)
    targets = keys @ true.T
    fit = theory.static_patch(keys, targets)
    assert torch.allclose(fit.dense(), true, atol=1e-10)
    # with K < d_in the fit is the minimum-norm interpolant
    few = theory.static_patch(keys[:3], targets[:3])
    assert torch.allclose(few.apply(keys[:3]), targets[:3], atol=1e-10)
    assert torch.allclose(few.dense(), targets[:3].T @ torch.linalg.pinv(keys[:3]).T, atol=1e-10)
    ridge = theory.static_patch(keys, targets, ridge=1.0)
    expect = targets.T @ keys @ torch.linalg.inv(keys.T @ keys + torch.eye(d_in, dtype=f64))
    assert torch.allclose(ridge.dense(), expect, atol=1e-10)


def test_normalized_inner():
    p, q = cp.LowRankPatch(rand(3, 2, seed=8), rand(4, 2)), cp.LowRankPatch(rand(3, 1), rand(4, 1))
    assert torch.isclose(theory.normalized_inner(p, p), torch.tensor(1.0, dtype=f64))
    assert torch.isclose(theory.normalized_inner(p, q), theory.normalized_inner(p.dense(), q.dense()))
