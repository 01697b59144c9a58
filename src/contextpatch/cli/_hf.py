"""``contextpatch extract`` / ``verify`` / ``generate``: HuggingFace models (or tiny random ones, offline)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

import torch
import typer

from .._errors import ContextPatchError
from ..adapters import TINY_ARCHS
from ..engine import OutputPatch
from ._app import app, console, fail, model_load_failed, print_json, print_table, quiet_hub_loading

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DType(str, Enum):
    """Model dtypes offered on the command line."""

    float32 = "float32"
    float64 = "float64"


Family = Enum("Family", {name: name for name in TINY_ARCHS}, type=str)   # the families with tiny random models
Family.__doc__ = "Families a tiny random model can be built for (``--arch``)."


@dataclass
class _Inputs:
    model: torch.nn.Module
    input_ids: torch.Tensor
    n_context: int
    token_type_ids: torch.Tensor | None
    arch: str
    tokenizer: object = None


def _parse_ids(text: str, what: str, vocab: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        fail(f"with --random, --{what} must be token ids (e.g. '5,17,42'), got {text!r}")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        fail(f"--{what} token ids {bad} are outside the vocabulary [0, {vocab})")
    return ids


def _load(model: str | None, arch: str | None, random: bool, context: str | None, query: str | None,
          context_len: int, query_len: int, dtype: str, device: str, seed: int) -> _Inputs:
    dtype, arch = getattr(dtype, "value", dtype), getattr(arch, "value", arch)
    if dtype not in _DTYPES:
        fail(f"--dtype must be float32 or float64, got {dtype!r}")
    dt = _DTYPES[dtype]
    if random == (model is not None):
        fail("give either --model PATH_OR_NAME or --arch ARCH --random")
    try:
        torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r} is not a torch device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    if random:
        from ..adapters import TINY_ARCHS, tiny_model
        if arch is None or arch not in TINY_ARCHS:
            fail(f"--random needs --arch, one of: {', '.join(TINY_ARCHS)} (got {arch!r})")
        if context_len < 1 or query_len < 1:
            fail("--context-len and --query-len must be ≥ 1")
        m = tiny_model(arch, dtype=dt, seed=seed, device=device)
        vocab = m.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        c = _parse_ids(context, "context", vocab) if context else torch.randint(3, vocab, (context_len,),
                                                                                generator=g).tolist()
        q = _parse_ids(query, "query", vocab) if query else torch.randint(3, vocab, (query_len,),
                                                                          generator=g).tolist()
        if not c or not q:
            fail("the context and the query need at least one token each")
        return _Inputs(m, torch.tensor([c + q]), len(c), None, arch)
    if context is None or query is None:
        fail("--model needs --context TEXT and --query TEXT")
    if (model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]) and \
            not os.path.isdir(os.path.expanduser(model)):
        fail(f"--model {model!r}: no such folder (give a local model folder or a Hub name like 'gpt2')")
    try:
        import transformers as tf
        with quiet_hub_loading():
            cfg = tf.AutoConfig.from_pretrained(model)
            auto = tf.AutoModel if cfg.model_type == "bert" else tf.AutoModelForCausalLM
            m = auto.from_pretrained(model, dtype=dt, attn_implementation="eager").to(device).eval()
            tok = tf.AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, KeyError) as e:
        model_load_failed(model, e)
    from ..adapters import get_adapter
    try:
        family = get_adapter(m).name
    except ContextPatchError as e:
        fail(str(e))
    c = tok(context)["input_ids"]
    q = tok(query, add_special_tokens=False)["input_ids"]
    if not c or not q:
        fail("the context and the query must each tokenize to at least one token")
    return _Inputs(m, torch.tensor([c + q]), len(c), None, family, tok)


_MODEL = typer.Option(None, "--model", help="HF model path or Hub name (needs the weights or network).")
_ARCH = typer.Option(None, "--arch", case_sensitive=False, help="Tiny random model family (with --random).")
_RANDOM = typer.Option(False, "--random", help="Build a tiny random-weight model offline (needs --arch).")
_CONTEXT = typer.Option(None, "--context", help="Context text (--model) or token ids '5,17,42' (--random).")
_QUERY = typer.Option(None, "--query", help="Query text (--model) or token ids (--random).")
_CLEN = typer.Option(8, "--context-len", help="--random without --context: random context length.")
_QLEN = typer.Option(4, "--query-len", help="--random without --query: random query length.")
_DTYPE = typer.Option(DType.float32, "--dtype", case_sensitive=False, help="Model dtype.")
_DEVICE = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda:0.")
_SEED = typer.Option(0, "--seed", help="Seed of the random model and random token ids.")
_BOS = typer.Option(True, "--bos-in-context/--bos-in-query",
                    help="Whether the first token (BOS) counts as context or stays in the context-free pass.")
_RENUM = typer.Option(False, "--renumber-positions", help="Give the query positions 0.. instead of its original ones.")
_OUTP = typer.Option(OutputPatch.auto, "--output-patch", case_sensitive=False,
                     help="Output-slot variant: auto (bias if the MLP output has one, else weight; Gemma-2/3 stable; "
                          "Mixtral moe), bias, weight, or for Gemma-2/3 scale (plain, ill-conditioned) / stable.")
_JSON = typer.Option(False, "--json", help="Print one JSON object instead of tables.")


def _opts(bos: bool, renumber: bool, output_patch: OutputPatch) -> dict:
    return dict(bos_is_context=bos, renumber_positions=renumber, output_patch=OutputPatch(output_patch).value)


@app.command("extract")
def extract_cmd(model: str = _MODEL, arch: Family = _ARCH, random: bool = _RANDOM, context: str = _CONTEXT,
                query: str = _QUERY, out: str = typer.Option(..., "--out", help="Directory for the patch files."),
                context_len: int = _CLEN, query_len: int = _QLEN, dtype: DType = _DTYPE, device: str = _DEVICE,
                seed: int = _SEED, bos: bool = _BOS, renumber: bool = _RENUM, output_patch: OutputPatch = _OUTP,
                json_out: bool = _JSON) -> None:
    """Turn the context into per-layer, per-token MLP patches, save them (safetensors + JSON) and print a summary."""
    from ..engine import extract

    inp = _load(model, arch, random, context, query, context_len, query_len, dtype, device, seed)
    try:
        patches = extract(inp.model, inp.input_ids, context=inp.n_context,
                          **_opts(bos, renumber, output_patch))
        path = patches.save(out)
    except ContextPatchError as e:
        fail(str(e))
    except OSError as e:
        fail(f"could not write {out}: {e}")
    rows = patches.summary()
    if json_out:
        print_json({"out": os.fspath(path), "arch": inp.arch, "dtype": dtype, "slot": patches.meta.slot,
                    "num_query_tokens": int(patches.valid.sum()), "layers": rows})
        return
    console.print(f"{inp.arch}: {patches.meta.variant}")
    cols = ["layer", "‖ΔW_in‖", "‖ΔW_in‖/‖W_in‖", "output", "‖Δ_out‖", "‖Δ_out‖ rel", "min ‖z‖"]
    print_table(f"patches ({patches.meta.slot} slot, max over {int(patches.valid.sum())} query tokens)", cols,
                [[r["layer"], r["dW_in"], r["dW_in_rel"] if r["dW_in_rel"] is not None else "-", r["out"],
                  r["d_out"], r["d_out_rel"] if r["d_out_rel"] is not None else "-", r["z_norm_min"]] for r in rows])
    console.print(f"saved to {path}")


@app.command("verify")
def verify_cmd(model: str = _MODEL, arch: Family = _ARCH, random: bool = _RANDOM, context: str = _CONTEXT,
               query: str = _QUERY, context_len: int = _CLEN, query_len: int = _QLEN, dtype: DType = _DTYPE,
               device: str = _DEVICE, seed: int = _SEED, bos: bool = _BOS, renumber: bool = _RENUM,
               output_patch: OutputPatch = _OUTP, json_out: bool = _JSON) -> None:
    """Max |output| difference: patched context-free vs with-context, and the unpatched control."""
    from ..engine import verify

    inp = _load(model, arch, random, context, query, context_len, query_len, dtype, device, seed)
    try:
        v = verify(inp.model, inp.input_ids, context=inp.n_context, **_opts(bos, renumber, output_patch))
    except ContextPatchError as e:
        fail(str(e))
    d = {"max_abs_diff": v.max_abs_diff, "control_max_abs_diff": v.control_max_abs_diff, "dtype": v.dtype,
         "arch": inp.arch, "model_class": v.arch, "slot": v.slot, "output": v.output, "num_layers": v.num_layers,
         "num_query_tokens": v.num_query_tokens}
    if json_out:
        print_json(d)
        return
    console.print(f"{inp.arch} ({v.arch}, {v.dtype}, {v.num_layers} layers, {v.num_query_tokens} query tokens, "
                  f"{v.slot} output patch), compared on {v.output}:")
    console.print(f"  max |patched − with-context|   = {v.max_abs_diff:.3e}")
    console.print(f"  control |unpatched − with-ctx| = {v.control_max_abs_diff:.3e}")


def _plain_logits(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits.double()


@app.command("generate")
def generate_cmd(model: str = _MODEL, arch: Family = _ARCH, random: bool = _RANDOM, context: str = _CONTEXT,
                 query: str = _QUERY, max_new_tokens: int = typer.Option(8, "--max-new-tokens",
                                                                        help="Tokens to generate."),
                 context_len: int = _CLEN, query_len: int = _QLEN, dtype: DType = _DTYPE, device: str = _DEVICE,
                 seed: int = _SEED, bos: bool = _BOS, renumber: bool = _RENUM, output_patch: OutputPatch = _OUTP,
                 json_out: bool = _JSON) -> None:
    """Greedy decoding from the query WITHOUT the context, every new token patched on the fly (exact: the same
    tokens as with the context), next to plain forward passes with the context and without it (the control)."""
    from ..engine import generate, make_layout

    inp = _load(model, arch, random, context, query, context_len, query_len, dtype, device, seed)
    opts = _opts(bos, renumber, output_patch)
    try:
        res = generate(inp.model, inp.input_ids, context=inp.n_context, max_new_tokens=max_new_tokens, **opts)
        lay = make_layout(inp.input_ids, inp.n_context, bos_is_context=bos, renumber_positions=renumber)
    except ContextPatchError as e:
        fail(str(e))
    # independent references on the patched run's own history: plain passes with the context and without it
    new = res.tokens.to(inp.input_ids.device)
    steps = torch.arange(1, max_new_tokens, device=new.device)[None]
    full = torch.cat([inp.input_ids, new[:, :-1]], 1)
    free = torch.cat([lay.query_ids, new[:, :-1]], 1)
    full_pos = torch.arange(full.shape[1], device=new.device)[None]
    free_pos = torch.cat([lay.position_ids, lay.position_ids[:, -1:] + steps], 1)
    k = max_new_tokens
    with_ctx = _plain_logits(inp.model, full, full_pos)[:, -k:]
    without = _plain_logits(inp.model, free, free_pos)[:, -k:]
    plain_tokens, plain_pos = lay.query_ids, lay.position_ids
    for _ in range(k):                            # the control's own greedy continuation, for the reader
        nxt = _plain_logits(inp.model, plain_tokens, plain_pos)[:, -1].argmax(-1, keepdim=True)
        plain_tokens, plain_pos = torch.cat([plain_tokens, nxt], 1), torch.cat([plain_pos, plain_pos[:, -1:] + 1], 1)
    plain_new = plain_tokens[:, -k:]
    ref = with_ctx.argmax(-1)

    def show(ids: torch.Tensor) -> str | list[int]:
        ids = ids[0].tolist()
        return inp.tokenizer.decode(ids) if inp.tokenizer is not None else ids

    d = {"arch": inp.arch, "dtype": getattr(dtype, "value", dtype), "seed": seed, "max_new_tokens": k,
         "num_query_tokens": int(lay.query_ids.shape[1]), "tokens": new[0].tolist(),
         "with_context_tokens": ref[0].tolist(), "without_context_tokens": plain_new[0].tolist(),
         "agreement": float((new == ref).double().mean()),
         "max_abs_diff": max(res.max_abs_diff), "control_max_abs_diff": float((without - with_ctx).abs().max())}
    if inp.tokenizer is not None:
        d.update(text=show(new), with_context_text=show(ref), without_context_text=show(plain_new))
    if json_out:
        print_json(d)
        return
    console.print(f"{inp.arch} ({d['dtype']}): {k} new tokens from the {d['num_query_tokens']} kept tokens alone, "
                  "patched on the fly")
    from rich.markup import escape  # model text is data, never rich markup

    console.print(f"  without the context, patched   : {escape(str(show(new)))}")
    console.print(f"  with the context (plain pass)  : {escape(str(show(ref)))}")
    console.print(f"  without the context, unpatched : {escape(str(show(plain_new)))}   (control)")
    console.print(f"  agreement {d['agreement']:.2f}; max |patched − with-context| logit = {d['max_abs_diff']:.3e}; "
                  f"control |unpatched − with-context| = {d['control_max_abs_diff']:.3e}")
