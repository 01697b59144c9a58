"""Equivalence on contextual blocks and Pre-LN stacks: T_W(C, x) = T_{W+ΔW}(C∖Y, x), with controls."""

import pytest
import torch
from hypothesis import assume, given, reject
from hypothesis import strategies as st

import contextpatch as cp
from contextpatch._verify import verify_random_block
from contextpatch.blocks import (
    MLP,
    ContextualBlock,
    PreLNStack,
    context_outputs,
    extract_patches,
    make_layer,
    run_blocks,
    subcontext_mask,
)

BOUND = {"float64": 1e-12, "float32": 1e-5}


@st.composite
def block_case(draw):
    heads = draw(st.integers(1, 3))
    d_model = heads * draw(st.integers(1, 4))
    n = draw(st.integers(1, 64))
    remove_all = draw(st.booleans())
    remove = None if remove_all else draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return dict(d_model=d_model, n_heads=heads, n_context=n, remove=remove,
                d_hidden=draw(st.integers(1, 24)), seed=draw(st.integers(0, 10**6)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layer", ["softmax", "linear", "rnn"])
@given(case=block_case(), n_layers=st.sampled_from([0, 0, 1, 3]))
def test_equivalence_property(layer, dtype, case, n_layers):
    try:
        r = verify_random_block(layer=layer, n_layers=n_layers, dtype=dtype, batch=2, **case)
    except cp.DegenerateNormError:
        # e.g. linear attention with d_model = 1 and k·q ≈ 0: ‖A(x)‖ is (near) zero, and refusing is correct
        reject()
    # rounding scales with the O(1) activations, not with |T_W(C, x)| alone (which can be ≈ 0 by chance)
    scale = max(1.0, r.max_abs_diff / r.rel_diff if r.rel_diff else 0.0)
    tol = BOUND[dtype] * scale
    assert r.max_abs_diff <= tol, r
    # control: the bound has power, i.e. without the patch the reduced-context output would miss it. Draws where
    # removing Y changes the output by less than the bound say nothing and are skipped (hypothesis errors if all do).
    assume(r.control_max_abs_diff > tol)


@pytest.mark.parametrize("layer", ["softmax", "linear", "rnn"])
@pytest.mark.parametrize("n_layers", [0, 4])
def test_equivalence_control_is_large(layer, n_layers):
    r = verify_random_block(layer=layer, n_layers=n_layers, n_context=12, dtype="float64", seed=3)
    assert r.rel_diff <= 1e-12
    assert r.control_max_abs_diff > 1e-2


def test_single_block_matches_theorem_formula():
    """The block extractor's patch at the query is exactly Thm 2.2's ΔW = (W δA) aᵀ/‖a‖²."""
    torch.manual_seed(0)
    block = ContextualBlock(layer=make_layer("softmax", d_model=6, n_heads=3), mlp=MLP(d_in=6, d_hidden=9)).double()
    C, x = torch.randn(10, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    Y = [0, 2, 3, 7]
    with torch.no_grad():
        full, reduced = context_outputs(block.layer, C, x, remove=Y)
        thm = cp.token_patch(block.mlp.W, full - reduced, reduced)
        keep = subcontext_mask(10, Y)
        P = extract_patches([block], torch.cat([C, x[None]]), keep)
        ref = block(torch.cat([C, x[None]]))[-1]
        patched = block.mlp(reduced, patch=thm)
    assert torch.allclose(P[0].weight[-1].dense(), thm.dense(), atol=1e-14)
    assert P[0].residual is None
    assert torch.allclose(ref, patched, atol=1e-13)
    assert (ref - block.mlp(reduced)).abs().max() > 1e-2


def test_all_positions_in_a_stack():
    """Innocenti & Achour: patches for every sequence position, not only the last."""
    torch.manual_seed(1)
    stack = PreLNStack(n_layers=3, d_model=6, n_heads=2).double()
    tokens = torch.randn(2, 11, 6, dtype=torch.float64)
    keep = subcontext_mask(10, [0, 1, 2])
    with torch.no_grad():
        P = extract_patches(stack.blocks, tokens, keep)
        ref = stack(tokens)[:, keep]
        got = stack(tokens[:, keep], P)
        control = stack(tokens[:, keep])
    assert (ref - got).abs().max() <= 1e-12 * ref.abs().max()
    assert (ref - control)[:, -1].abs().max() > 1e-2
    assert P[0].weight.batch_shape == (2, 8) and P[0].residual.delta.shape == (2, 8, 6)
    # the residual (steering-vector) patch equals the attention-output difference at the query
    # in the first block, where the block inputs agree
    first = stack.blocks[0]
    with torch.no_grad():
        a_full, _ = first.mlp_input(tokens)
        a_red, _ = first.mlp_input(tokens[:, keep])
    assert torch.allclose(P[0].residual.delta[:, -1], a_full[:, -1] - a_red[:, -1], atol=1e-14)


def test_non_causal_attention_every_other_token_is_context():
    torch.manual_seed(2)
    stack = PreLNStack(n_layers=2, d_model=4, n_heads=2, causal=False).double()
    tokens = torch.randn(7, 4, dtype=torch.float64)
    keep = torch.tensor([False, True, False, False, True, False, True])
    with torch.no_grad():
        P = extract_patches(stack.blocks, tokens, keep)
        err = (stack(tokens)[keep] - stack(tokens[keep], P)).abs().max()
        ctl = (stack(tokens)[keep] - stack(tokens[keep])).abs().max()
    assert err <= 1e-12 and ctl > 1e-2


def test_user_defined_contextual_layer():
    """Any module mapping (..., n, d) -> (..., n, d) plugs in: here a causal running mean."""

    class RunningMean(torch.nn.Module):
        def forward(self, h):
            return h.cumsum(-2) / torch.arange(1, h.shape[-2] + 1, dtype=h.dtype)[:, None]

    torch.manual_seed(3)
    block = ContextualBlock(layer=RunningMean(), mlp=MLP(d_in=5, d_hidden=8)).double()
    tokens = torch.randn(6, 5, dtype=torch.float64)
    keep = subcontext_mask(5, None)
    with torch.no_grad():
        P = extract_patches([block], tokens, keep)
        assert torch.allclose(block(tokens)[-1], run_blocks([block], tokens[keep], P)[-1], atol=1e-13)
        assert (block(tokens)[-1] - block(tokens[keep])[-1]).abs().max() > 1e-2


def test_bad_inputs():
    torch.manual_seed(0)
    layer = make_layer("softmax", d_model=4, n_heads=2).double()
    C, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with pytest.raises(cp.ContextPatchError, match="empty"):
        context_outputs(layer, C[:0], x)
    with pytest.raises(cp.ContextPatchError, match="not a subset"):
        context_outputs(layer, C, x, remove=[0, 5])
    with pytest.raises(cp.ContextPatchError, match="twice"):
        context_outputs(layer, C, x, remove=[1, 1])
    with pytest.raises(cp.ContextPatchError, match="does not match"):
        context_outputs(layer, C, torch.randn(5, dtype=torch.float64))
    with pytest.raises(cp.ContextPatchError, match="length 3"):
        subcontext_mask(3, torch.tensor([True, False]))
    with pytest.raises(cp.ContextPatchError, match="divisible"):
        make_layer("softmax", d_model=5, n_heads=2)
    with pytest.raises(cp.ContextPatchError, match="unknown contextual layer"):
        make_layer("lstm", d_model=4)
    block = ContextualBlock(layer=layer, mlp=MLP(d_in=4, d_hidden=3)).double()
    with pytest.raises(cp.ContextPatchError, match="nothing is removed"):
        extract_patches([block], torch.randn(4, 4, dtype=torch.float64), torch.ones(4, dtype=torch.bool))
    with pytest.raises(cp.ContextPatchError, match="keep mask has shape"):
        extract_patches([block], torch.randn(4, 4, dtype=torch.float64), torch.ones(3, dtype=torch.bool))
    # an all-zero query through a bias-free layer: ‖A(x)‖ = 0 raises instead of returning NaN
    zero_block = ContextualBlock(layer=make_layer("linear", d_model=4, n_heads=2),
                                 mlp=MLP(d_in=4, d_hidden=3)).double()
    tokens = torch.cat([torch.randn(3, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)])
    with pytest.raises(cp.DegenerateNormError):
        extract_patches([zero_block], tokens, subcontext_mask(3, None))
