"""Shared context passes (issue 5): many queries and every prefix from ONE packed context pass.

Each result is compared with the per-row reference (a separate extract per query / per prefix) and with the
with-context logits; controls show the context matters.
"""

import pytest
import torch

from contextpatch import ContextPatchError, extract
from contextpatch.adapters import tiny_model
from contextpatch.engine import (
    dynamics_from_patches,
    extract_many,
    extract_prefixes,
    extract_prefixes_naive,
    prefix_dynamics,
)

# float64 floors: GPT-2/Falcon compute everything in float64; Llama/Gemma/Mixtral have HF float32 islands
# (softmax, RMSNorm, RoPE) whose rounding differs between a packed and a separate sequence (~1e-7 relative).
TOL64 = {"gpt2": 1e-12, "falcon": 1e-12, "llama": 1e-5, "gemma3": 1e-5, "mixtral": 1e-5}


def _ids(n, shape, seed):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(ids[None], position_ids=pos[None]).logits[0]


@pytest.mark.parametrize("arch", sorted(TOL64))
def test_extract_many_matches_with_context_logits(arch):
    model = tiny_model(arch, dtype=torch.float64, seed=0)
    ctx, qs = _ids(100, (12,), 1), _ids(100, (5, 3), 2)
    P = extract_many(model, ctx, qs, chunk_size=2)
    assert P.batch_shape == (5, 3)
    out = P.run(model)
    worst = control = 0.0
    for q in range(5):
        ref = _logits(model, torch.cat([ctx, qs[q]]), torch.arange(15))[12:]
        worst = max(worst, float((ref - out[q]).abs().max()))
        alone = _logits(model, qs[q], torch.arange(12, 15))
        control = max(control, float((ref - alone).abs().max()))
    assert worst <= TOL64[arch] and control > 1e-2
    # the same input-side patches as a separate extraction of row 0 (well-conditioned factors)
    ref0 = extract(model, torch.cat([ctx, qs[0]]), context=12)
    for got, exp in zip(P.layers, ref0.layers, strict=True):
        assert torch.allclose(got["in.V"][0], exp["in.V"][0], atol=100 * TOL64[arch], rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("where", ["prefix", "original"])
def test_prefix_patches_equal_naive(arch, where):
    model = tiny_model(arch, dtype=torch.float64, seed=1)
    ctx, q = _ids(100, (10,), 3), _ids(100, (2,), 4)
    fast = extract_prefixes(model, ctx, q, query_positions=where)
    slow = extract_prefixes_naive(model, ctx, q, query_positions=where)
    assert fast.batch_shape == slow.batch_shape == (10, 2)
    assert torch.equal(fast.position_ids, slow.position_ids)
    # the patched context-free logits of every prefix row equal the with-context logits of that prefix prompt
    out = fast.run(model)
    worst = control = 0.0
    for i in range(1, 11):
        start = i if where == "prefix" else 10
        pos = torch.cat([torch.arange(i), torch.arange(start, start + 2)])
        ref = _logits(model, torch.cat([ctx[:i], q]), pos)[i:]
        worst = max(worst, float((ref - out[i - 1]).abs().max()))
        control = max(control, float((ref - _logits(model, q, pos[i:])).abs().max()))
    assert worst <= TOL64[arch] and control > 1e-2
    d_fast, d_slow = dynamics_from_patches(fast), dynamics_from_patches(slow)
    scale = float(d_slow.step_norms.max())
    assert float((d_fast.step_norms - d_slow.step_norms).abs().max()) <= 1e3 * TOL64[arch] * max(scale, 1)
    assert float((d_fast.patch_norms - d_slow.patch_norms).abs().max()) <= 1e3 * TOL64[arch] * max(scale, 1)


def test_prefix_dynamics_float32_matches_naive():
    """The issue's bar: batched prefix dynamics equal the naive n passes to float32 max diff ≤ 1e-4."""
    model = tiny_model("llama", dtype=torch.float32, seed=2)
    ctx, q = _ids(100, (16,), 5), _ids(100, (1,), 6)
    fast = prefix_dynamics(model, ctx, q, chunk_size=5)
    slow = dynamics_from_patches(extract_prefixes_naive(model, ctx, q))
    assert float((fast.step_norms - slow.step_norms).abs().max()) <= 1e-4
    assert float((fast.patch_norms - slow.patch_norms).abs().max()) <= 1e-4
    assert float(fast.step_norms.max()) > 1e-2  # control: the dynamics are not trivially zero
    d = fast.to_dict()
    assert len(d["step_norms"]) == fast.num_layers and len(d["step_norms"][0]) == 15
    assert d["prefix_lengths"] == list(range(1, 17))


def test_parallel_block_dynamics_live_in_the_output_slot():
    model = tiny_model("falcon", dtype=torch.float64, seed=0)
    d = prefix_dynamics(model, _ids(100, (6,), 7), _ids(100, (1,), 8))
    assert float(d.patch_norms.max()) < 1e-10          # the MLP input never sees the context
    assert float(d.output_patch_norms.min()) > 1e-3     # the output slot carries it


def test_shared_bad_input():
    bert = tiny_model("bert", dtype=torch.float32, seed=0)
    with pytest.raises(ContextPatchError, match="causal"):
        extract_many(bert, _ids(100, (4,), 0), _ids(100, (2, 2), 0))
    gpt2 = tiny_model("gpt2", dtype=torch.float32, seed=0)
    with pytest.raises(ContextPatchError, match="non-empty"):
        extract_many(gpt2, torch.zeros(0, dtype=torch.long), _ids(100, (2, 2), 0))
    with pytest.raises(ContextPatchError, match="prefix lengths"):
        extract_prefixes(gpt2, _ids(100, (4,), 0), _ids(100, (1,), 0), prefix_lengths=[0, 2])
    with pytest.raises(ContextPatchError, match="no queries"):
        extract_many(gpt2, _ids(100, (4,), 0), [])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_extract_many_queries_of_different_lengths(arch):
    model = tiny_model(arch, dtype=torch.float64, seed=3)
    ctx = _ids(100, (10,), 9)
    queries = [_ids(100, (t,), 20 + t) for t in (3, 1, 4, 2)]
    P = extract_many(model, ctx, queries, chunk_size=3)
    assert P.batch_shape == (4, 4) and P.valid.sum(1).tolist() == [3, 1, 4, 2]
    out = P.run(model)
    worst = control = 0.0
    for q, query in enumerate(queries):
        t = len(query)
        ref = _logits(model, torch.cat([ctx, query]), torch.arange(10 + t))[10:]
        worst = max(worst, float((ref - out[q, :t]).abs().max()))
        control = max(control, float((ref - _logits(model, query, torch.arange(10, 10 + t))).abs().max()))
    assert worst <= TOL64[arch] and control > 1e-2
