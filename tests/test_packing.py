"""Packed rows over one shared context give the same outputs as separate runs (the KV-cache reuse)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from contextpatch import ContextPatchError
from contextpatch._packing import pack_rows


def _model(name):
    torch.manual_seed(0)
    cfg = (GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
           if name == "gpt2" else
           LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()


@pytest.mark.parametrize("name,tol", [("gpt2", 1e-12), ("llama", 1e-6)])
@pytest.mark.parametrize("where", ["prefix", "original"])
def test_packed_rows_equal_separate_runs(name, tol, where):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 64, (9,), generator=g)
    queries = [torch.randint(0, 64, (3,), generator=g) for _ in range(4)]
    prefixes = [0, 2, 9, 5]
    p = pack_rows(ctx, queries, prefixes, query_positions=where)
    with torch.no_grad():
        packed = model(p.input_ids, attention_mask=p.mask(torch.float64), position_ids=p.position_ids).logits[0]
        worst, control = 0.0, 0.0
        for q, n, rows in zip(queries, prefixes, p.row_positions, strict=True):
            start = n if where == "prefix" else 9
            ids = torch.cat([ctx[:n], q])[None]
            pos = torch.cat([torch.arange(n), torch.arange(start, start + 3)])[None]
            ref = model(ids, position_ids=pos).logits[0, n:]
            worst = max(worst, float((ref - packed[rows]).abs().max()))
            alone = model(q[None], position_ids=torch.arange(start, start + 3)[None]).logits[0]
            control = max(control, float((ref - alone).abs().max()))
    assert worst <= tol
    assert control > 1e-2  # the context matters: packing is not trivially equal


def test_pack_rows_bad_input():
    ctx = torch.arange(4)
    with pytest.raises(ContextPatchError, match="prefix lengths"):
        pack_rows(ctx, [torch.arange(2)], [5])
    with pytest.raises(ContextPatchError, match="non-empty"):
        pack_rows(ctx, [torch.arange(2), torch.arange(0)], [1, 2])
    with pytest.raises(ContextPatchError, match="one prefix length per query"):
        pack_rows(ctx, [torch.arange(2)], [1, 2])


def test_rows_of_different_lengths():
    model = _model("gpt2")
    ctx = torch.arange(5, 12)
    queries = [torch.tensor([3, 4, 5]), torch.tensor([9]), torch.tensor([1, 2])]
    p = pack_rows(ctx, queries, [7, 7, 3], query_positions="original")
    assert p.row_positions.tolist() == [[7, 8, 9], [10, 10, 10], [11, 12, 12]]
    assert p.valid.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    with torch.no_grad():
        packed = model(p.input_ids, attention_mask=p.mask(torch.float64), position_ids=p.position_ids).logits[0]
        for q, n, rows, ok in zip(queries, [7, 7, 3], p.row_positions, p.valid, strict=True):
            ids = torch.cat([ctx[:n], q])[None]
            pos = torch.cat([torch.arange(n), torch.arange(7, 7 + len(q))])[None]
            ref = model(ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[0, n:]
            assert torch.allclose(ref, packed[rows[ok]], atol=1e-12)
