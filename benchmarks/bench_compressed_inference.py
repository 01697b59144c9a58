"""What a compressed context saves at inference: greedy generation with the context in the prompt vs a static adapter.

Workload: greedy generation of 64 new tokens (``min_new_tokens = max_new_tokens = 64``, KV cache on) after a
16-token query, on a zoo Llama (``icl-llama`` if shipped, else a random-weight Llama stand-in: 4 layers, d = 256,
vocab 108, float32, eager), CPU, at context lengths 256, 1024 and 4096. The context is zoo text: ``<bos> mode:
reverse ;`` and list => list demonstrations up to the length; query and calibration queries are more pairs:

    (a) with context: the plain model on [context, query] (the context lives in the prompt and its KV cache)
    (b) hooked:       the plain model on [BOS, query] inside ``static.applied(model)`` (the static adapter as hooks:
                      side paths y + (x V) Uᵀ)
    (e) dense:        the same inside ``static.applied(model, dense=True)`` (each patched module runs on W + ΔW,
                      computed when the with-block is entered; the parameters untouched)
    (c) merged:       ``static.merge(model)`` (the adapter folded into the weights, no hooks) on [BOS, query]
    (d) no context:   the plain model on [BOS, query]

The static adapter is ``fit_static(model, context, 16 random calibration queries of 8 tokens, rank=16,
keep_prefix=1, renumber_positions=True)`` (the drop-in setting: the context-free prompt runs at positions 0..).

    time(c) / time(d)                       bar ≤ 1.05   (per context length)
    time(b) / time(c), time(e) / time(c)    bar ≤ 1.15   (per context length)
    time(a) / time(c) at 4096 ctx tokens    bar ≥ 2
    greedy tokens of (b) and (c) agree      bar ≥ 0.95 of the tokens (correctness: same function up to rounding)
    greedy tokens of (e) and (c) agree      bar = 1 (the same weights and kernels)

(b) and (e) generate inside a with-block entered once before the timing, as a server runs an adapter and as (c)
is merged once; these one-time costs are timed on their own and reported with the rows: ``merge`` (a deep copy
and W + ΔW) and entering ``applied()`` (the weight-fingerprint check of every parameter; for (e) also W + ΔW).

Times are the best of 11 interleaved rounds (a b c d e a b c d e …; --quick: 1) after a warm-up and include the
prefill; tokens/s = 64 / time. Peak memory is
``_common.peak_memory`` (fresh child per workload: resident-set increase during one generation, weights excluded;
not measured under --quick, where it would dominate the run time).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from _common import interleaved_best, peak_memory, report, run_script

from contextpatch import fit_static

QUERY = 16
CALIB, CALIB_LEN = 16, 8
RANK = 16


def sizes(quick: bool) -> tuple[tuple[int, ...], int]:
    """(context lengths, new tokens)."""
    return ((64, 128), 8) if quick else ((256, 1024, 4096), 64)


def load_model(quick: bool):
    """(model, description): the zoo ``icl-llama`` if shipped (not in --quick), else a random-weight Llama."""
    if not quick:
        try:
            import contextpatch.zoo as zoo

            p = zoo.path("icl-llama")
            if p.is_dir():
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
                return model, f"zoo icl-llama ({p})"
        except Exception:  # noqa: BLE001 - not shipped / not importable: fall back to the random stand-in
            pass
    from transformers import LlamaConfig, LlamaForCausalLM

    ctxs, new = sizes(quick)
    d, layers, inter = (64, 2, 128) if quick else (256, 4, 512)
    cfg = LlamaConfig(vocab_size=108, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max(ctxs) + 128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    return model, f"random-weight Llama stand-in ({layers} layers, d = {d}, vocab 108, float32, eager; " \
                  "zoo icl-llama not shipped)"


def _bos(model) -> int:
    b = model.config.bos_token_id
    return 1 if b is None else int(b)


def _instruction_tokens(n: int, seed: int, *, head: bool) -> torch.Tensor:
    """``n`` tokens of zoo instruction text (``mode: reverse ;`` first when ``head``, then list => list pairs)."""
    import numpy as np

    from contextpatch.zoo.tasks import InstructionTask
    from contextpatch.zoo.tokenizer import encode_words

    rng = np.random.default_rng(seed)
    task = InstructionTask(modes=("reverse",))
    words = ["mode:", "reverse", ";"] if head else []
    while len(words) < n:
        q, a = task._pair(rng, "reverse")
        words += f"{q} {a} ;".split()
    return torch.tensor(encode_words(" ".join(words[:n]), bos=False))


def _context(model, n: int) -> torch.Tensor:
    """``<bos> mode: reverse ; …`` demonstrations, n tokens in all (zoo text: a context the zoo models use)."""
    return torch.cat([torch.tensor([_bos(model)]), _instruction_tokens(n - 1, 10 + n, head=True)])


def _query(model) -> torch.Tensor:
    return _instruction_tokens(QUERY, 3, head=False)


def fit(model, n: int):
    calib = [_instruction_tokens(CALIB_LEN, 100 + k, head=False) for k in range(CALIB)]
    return fit_static(model, _context(model, n), calib, rank=RANK, keep_prefix=1, renumber_positions=True, seed=100)


def _generator(model, prompt: torch.Tensor, new: int):
    x = prompt[None]
    am = torch.ones_like(x)
    pad = model.config.pad_token_id
    pad = 0 if pad is None else pad
    out: dict = {}

    def run():
        with torch.no_grad():
            out["tokens"] = model.generate(x, attention_mask=am, max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False, pad_token_id=pad)[0, x.shape[1]:]
        return out["tokens"]
    return run


def _prompts(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([context, query], [BOS, query])."""
    q = _query(model)
    return torch.cat([_context(model, n), q]), torch.cat([torch.tensor([_bos(model)]), q])


def setup(variant: str, quick: bool, n: int, static_dir: str | None = None):
    """The workload of one variant (a–e) at context length ``n``; for ``peak_memory`` (child process)."""
    model, _ = load_model(quick)
    _, new = sizes(quick)
    with_ctx, without = _prompts(model, n)
    if variant == "a":
        return _generator(model, with_ctx, new)
    if variant == "d":
        return _generator(model, without, new)
    from contextpatch import StaticPatches

    static = StaticPatches.load(static_dir) if static_dir else fit(model, n)
    if variant == "c":
        return _generator(static.merge(model), without, new)
    static.applied(model, dense=variant == "e").__enter__()      # entered once (never left in this child)
    return _generator(model, without, new)


def _dense_bytes(static, model) -> int:
    """Bytes of the W + ΔW copies that ``applied(dense=True)`` holds: one per patched matrix, bias or gain."""
    item = next(model.parameters()).element_size()
    n = 0
    for lp in static.layers:
        for p in [*lp.inputs.values(), lp.out_weight, lp.attn_out]:
            n += 0 if p is None else p.U.shape[0] * p.V.shape[0]
        n += sum(v.numel() for v in (lp.out_bias, lp.out_scale) if v is not None)
    return n * item


def _enter_exit(static, model, *, dense: bool) -> None:
    with static.applied(model, dense=dense):
        pass


def main(quick: bool = False, out: Path | None = None) -> list[dict]:
    ctxs, new = sizes(quick)
    model, desc = load_model(quick)
    print(f"compressed inference: {desc}; greedy {new} new tokens after a {QUERY}-token query; "
          "tokens/s = new tokens / total time (prefill included); peak memory = _common.peak_memory "
          "(RSS increase during one generation in a fresh child, weights excluded)")
    rows: list[dict] = []
    agree_tot = agree_n = exact_tot = 0
    info = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ctxs:
            static = fit(model, n)
            sdir = Path(tmp) / f"static_{n}"
            static.save(sdir)
            merged = static.merge(model)
            with_ctx, without = _prompts(model, n)
            hooked, dense = copy.deepcopy(model), copy.deepcopy(model)   # (b), (e): entered once, as (c) is merged once
            with static.applied(hooked), static.applied(dense, dense=True):
                gens = {"a": _generator(model, with_ctx, new), "b": _generator(hooked, without, new),
                        "c": _generator(merged, without, new), "d": _generator(model, without, new),
                        "e": _generator(dense, without, new)}
                t = interleaved_best(gens, repeat=1 if quick else 11)
                tb, tc, te = gens["b"](), gens["c"](), gens["e"]()
            entry = interleaved_best({"b": lambda s=static: _enter_exit(s, model, dense=False),
                                      "c": lambda s=static: s.merge(model),
                                      "e": lambda s=static: _enter_exit(s, model, dense=True)},
                                     repeat=1 if quick else 11)
            mem = {v: 0 if quick else peak_memory("bench_compressed_inference:setup", variant=v, quick=quick, n=n,
                                                  static_dir=None if v in "ad" else str(sdir)) for v in "abcde"}
            agree_tot += int((tb == tc).sum())
            agree_n += tb.numel()
            exact_tot += int((te == tc).sum())
            rc_d = t["c"] / t["d"]
            rows.append({"target": f"(c) merged / (d) no context time, ctx {n}", "measured": f"{rc_d:.3f}",
                         "bar": "≤ 1.05", "met": rc_d <= 1.05,
                         "detail": {"merged_s": round(t["c"], 4), "no_context_s": round(t["d"], 4)}})
            for v, what in (("b", "(b) hooked side paths"), ("e", "(e) applied(dense=True)")):
                r = t[v] / t["c"]
                rows.append({"target": f"{what} / (c) merged time, ctx {n}", "measured": f"{r:.3f}",
                             "bar": "≤ 1.15", "met": r <= 1.15,
                             "detail": {"applied_s": round(t[v], 4), "merged_s": round(t["c"], 4),
                                        "once_entering_applied_s": round(entry[v], 4),
                                        "once_merging_s": round(entry["c"], 4),
                                        "extra_weight_MiB": round(_dense_bytes(static, model) / 2**20, 2)
                                        if v == "e" else round(static.nbytes() / 2**20, 2)}})
            if n == max(ctxs):
                ra_c = t["a"] / t["c"]
                rows.append({"target": f"(a) with context / (c) merged time at {n}", "measured": f"{ra_c:.2f}x",
                             "bar": "≥ 2x", "met": ra_c >= 2,
                             "detail": {"with_context_s": round(t["a"], 4), "merged_s": round(t["c"], 4)}})
            names = {"a": "with context", "b": "hooked", "c": "merged", "d": "no context", "e": "dense"}
            info.append({"target": f"tokens/s (a) (b) (c) (d) (e) | peak MiB, ctx {n}",
                         "measured": " ".join(f"{new / t[v]:.0f}" for v in "abcde") + " | "
                         + (" ".join(f"{mem[v] / 2**20:.0f}" for v in "abcde") if not quick else "n/a"),
                         "bar": "(info)", "met": True,
                         "detail": {f"({v}) {names[v]}": f"{new / t[v]:.1f} tok/s, {t[v]:.4f} s, peak "
                                    + (f"{mem[v] / 2**20:.1f} MiB" if not quick else "not measured (--quick)")
                                    for v in "abcde"}})
    frac = agree_tot / agree_n
    rows.append({"target": "greedy tokens (b) hooked vs (c) merged agree", "measured": f"{frac:.3f}",
                 "bar": "≥ 0.95", "met": frac >= 0.95, "correctness": True,
                 "detail": {"tokens_compared": agree_n}})
    rows.append({"target": "greedy tokens (e) dense vs (c) merged agree", "measured": f"{exact_tot / agree_n:.3f}",
                 "bar": "= 1", "met": exact_tot == agree_n, "correctness": True,
                 "detail": {"tokens_compared": agree_n}})
    rows += info
    report("compressed inference", rows, out, quick)
    return rows


if __name__ == "__main__":
    run_script(main, __doc__)
