"""``contextpatch compress``: fit a static (query-independent) context adapter, evaluate it, save it."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import torch
import typer
from rich.progress import Progress

from .._errors import ContextPatchError
from ..engine import OutputPatch
from ._app import (
    app,
    console,
    err_console,
    fail,
    model_load_failed,
    print_json,
    print_table,
    quiet_hub_loading,
)
from ._hf import (
    _ARCH,
    _CLEN,
    _CONTEXT,
    _DEVICE,
    _DTYPE,
    _DTYPES,
    _JSON,
    _MODEL,
    _OUTP,
    _RANDOM,
    _SEED,
    DType,
    Family,
    _parse_ids,
)


class Export(str, Enum):
    """What ``compress --out`` writes."""

    static = "static"
    peft = "peft"
    merged = "merged"


def _model(model: str | None, arch: str | None, random: bool, dtype: str, device: str, seed: int):
    """(model, tokenizer or None, family name)."""
    dtype, arch = getattr(dtype, "value", dtype), getattr(arch, "value", arch)
    if dtype not in _DTYPES:
        fail(f"--dtype must be float32 or float64, got {dtype!r}")
    if random == (model is not None):
        fail("give either --model PATH_OR_NAME or --arch ARCH --random")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    if random:
        from ..adapters import TINY_ARCHS, tiny_model
        if arch is None or arch not in TINY_ARCHS:
            fail(f"--random needs --arch, one of: {', '.join(TINY_ARCHS)} (got {arch!r})")
        return tiny_model(arch, dtype=_DTYPES[dtype], seed=seed, device=device), None, arch
    try:
        import transformers as tf
        with quiet_hub_loading():
            m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype], attn_implementation="eager")
            m = m.to(device).eval()
            tok = tf.AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, KeyError) as e:
        model_load_failed(model, e)
    from ..adapters import get_adapter
    try:
        return m, tok, get_adapter(m).name
    except ContextPatchError as e:
        fail(str(e))


def _query_lines(path: str, tok, vocab: int) -> list[list[int]]:
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        fail(f"could not read --queries {path}: {e.strerror or e}")
    if tok is None:
        return [_parse_ids(ln, "queries", vocab) for ln in lines]
    out = [tok(ln, add_special_tokens=False)["input_ids"] for ln in lines]
    return [q for q in out if q]


@app.command("compress")
def compress_cmd(model: str = _MODEL, arch: Family = _ARCH, random: bool = _RANDOM, context: str = _CONTEXT,
                 calibration: int = typer.Option(16, "--calibration", help="Number of calibration queries: random "
                                                 "ones (--random) or the first N lines of --queries."),
                 queries: str = typer.Option(None, "--queries", help="File, one query per line (text with --model, "
                                             "token ids with --random): the first --calibration lines calibrate, "
                                             "the rest are held out for the evaluation."),
                 held_out: int = typer.Option(16, "--held-out", help="--random without --queries: number of random "
                                              "held-out queries."),
                 context_len: int = _CLEN, query_len: int = typer.Option(4, "--query-len", help="Length of random "
                                                                         "queries (--random without --queries)."),
                 ridge: float = typer.Option(1e-3, "--ridge", help="λ = ridge · mean ‖key‖² (0: plain least squares)."),
                 rank: int = typer.Option(None, "--rank", help="Keep at most this rank per matrix (default: full)."),
                 out: str = typer.Option(None, "--out", help="Directory to write the adapter (static.safetensors + "
                                         "static.json; with --export: the exported folder)."),
                 export: Export = typer.Option(Export.static, "--export", case_sensitive=False,
                                               help="static: contextpatch's own files; peft: a LoRA adapter folder "
                                                    "for peft.PeftModel.from_pretrained; merged: a standalone HF "
                                                    "checkpoint with the adapter folded into the weights."),
                 force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
                 keep_prefix: int = typer.Option(0, "--keep-prefix", help="Leading context tokens kept in the "
                                                 "context-free input (1: BOS), as a server runs the model."),
                 renumber: bool = typer.Option(False, "--renumber-positions", help="Run [kept prefix, query] at "
                                               "positions 0.. (drop-in) instead of the query's positions after "
                                               "the context."),
                 attention: bool = typer.Option(False, "--attention", help="Also patch the attention output "
                                                "projection (o_proj / c_proj): carries the context's rescaling of "
                                                "attention that MLP-only patches cannot (docs/adapters.md)."),
                 rank_method: str = typer.Option("svd", "--rank-method", help="With --rank: svd (truncate the "
                                                 "full fit) or rrr (reduced-rank ridge: the best rank-r fit)."),
                 dtype: DType = _DTYPE, device: str = _DEVICE, seed: int = _SEED, output_patch: OutputPatch = _OUTP,
                 json_out: bool = _JSON) -> None:
    """Compress a context into a static adapter: one query-independent patch per layer, fitted on calibration
    queries; evaluated on held-out queries against the no-context control."""
    from ..engine import evaluate_static, fit_static

    if calibration < 1 or held_out < 0 or query_len < 1 or context_len < 1:
        fail("--calibration, --query-len and --context-len must be ≥ 1 and --held-out ≥ 0")
    m, tok, family = _model(model, arch, random, dtype, device, seed)
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    if tok is None:
        ctx = _parse_ids(context, "context", vocab) if context else torch.randint(3, vocab, (context_len,),
                                                                                  generator=g).tolist()
    else:
        if context is None:
            fail("--model needs --context TEXT")
        ctx = tok(context)["input_ids"]
    if queries is not None:
        qs = _query_lines(queries, tok, vocab)
    elif tok is None:
        qs = torch.randint(3, vocab, (calibration + held_out, query_len), generator=g).tolist()
    else:
        fail("--model needs --queries FILE (one text query per line)")
    if not ctx or len(qs) < calibration:
        fail(f"need a non-empty context and at least --calibration={calibration} queries (got {len(qs)})")
    cal, held = [torch.tensor(q) for q in qs[:calibration]], [torch.tensor(q) for q in qs[calibration:]]
    ctx_t = torch.tensor(ctx)
    try:
        from ..adapters import get_adapter
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("fitting layers", total=len(get_adapter(m).resolve(m)))
            static = fit_static(m, ctx_t, cal, ridge=ridge, rank=rank, output_patch=OutputPatch(output_patch).value,
                                seed=seed, keep_prefix=keep_prefix, renumber_positions=renumber,
                                attention=attention, rank_method=rank_method,
                                progress=lambda i: bar.update(task, completed=i + 1))
        ev = evaluate_static(m, static, ctx_t, held) if held else {}
        export = Export(export)
        if out is None and export != Export.static:
            fail(f"--export {export.value} needs --out DIR")
        if out is None:
            path = None
        elif export == Export.peft:
            path = static.to_peft(m, out, force=force)
        elif export == Export.merged:
            path = static.save_merged(m, out, tokenizer=tok, force=force)
        else:
            if not force and os.path.isdir(out) and any(os.scandir(out)) and not os.path.isfile(
                    os.path.join(out, "static.json")):
                fail(f"{out} exists and holds other files; pass --force to write the adapter there")
            path = static.save(out)
    except ContextPatchError as e:
        fail(str(e))
    except OSError as e:
        fail(f"could not write {out}: {e}")
    info = {"arch": family, "dtype": getattr(dtype, "value", dtype), "slot": static.slot, "seed": seed, "ridge": ridge,
            "rank": rank, "keep_prefix": keep_prefix, "renumber_positions": renumber,
            "context_length": len(ctx), "calibration_queries": len(cal), "calibration_tokens":
            static.meta.options["num_calibration_tokens"], "held_out_queries": len(held), "nbytes": static.nbytes(),
            "out": os.fspath(path) if path else None, "export": Export(export).value}
    if json_out:
        print_json({**ev, **info, "layers": static.summary()})
        return
    console.print(f"{family}: static adapter of a {len(ctx)}-token context, {info['calibration_tokens']} calibration "
                  f"tokens, ridge {ridge}, rank {rank or 'full'}, {static.nbytes()} bytes")
    print_table(f"static patches ({static.slot} slot)", ["layer", "‖ΔW_in‖", "‖ΔW_in‖/‖W_in‖", "rank in", "‖Δ_out‖",
                                                         "rank out"],
                [[r["layer"], r["dW_in"], r["dW_in_rel"] if r["dW_in_rel"] is not None else "-", r["rank_in"],
                  r["d_out"], r["rank_out"] if r["rank_out"] is not None else "-"] for r in static.summary()])
    if ev:
        print_table(f"held-out: {ev['num_queries']} queries, {ev['num_tokens']} tokens (vs with-context logits)",
                    ["", "mean |Δlogit|", "max |Δlogit|", "KL", "top-1 agree"],
                    [["static adapter", ev["mean_abs_diff"], ev["max_abs_diff"], ev["kl"], ev["top1_agreement"]],
                     ["no context", ev["control_mean_abs_diff"], ev["control_max_abs_diff"], ev["control_kl"],
                      ev["control_top1_agreement"]]])
    else:
        console.print("no held-out queries: evaluation skipped")
    if path:
        console.print(f"saved to {path}")
