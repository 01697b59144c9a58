"""Engine behaviour: context specs, BOS/positions options, apply/restore, save/load, errors, generation."""

from __future__ import annotations

import json
import types

import pytest
import torch
from _reference import kept_positions, max_diff, reference  # tests/_reference.py: plain forward passes
from hypothesis import given, settings
from hypothesis import strategies as st

import contextpatch as cp
from contextpatch import (
    ContextPatchError,
    ContextPatches,
    DegenerateNormError,
    PatchFileError,
    UnsupportedModelError,
    extract,
    generate,
    run_patched,
    verify,
)
from contextpatch.adapters import SUPPORTED_FAMILIES, get_adapter, tiny_model
from contextpatch.engine import capture_targets, make_layout, patched_pass

CONTROL_MIN = 1e-2




@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def ids(B=2, T=12, seed=0):
    return torch.randint(3, 100, (B, T), generator=torch.Generator().manual_seed(seed))


# --- context / query specifications ---------------------------------------------------------------
@pytest.mark.parametrize("spec,kept", [
    (8, [[8, 9, 10, 11]] * 2),
    ((2, 6), [[0, 1, 6, 7, 8, 9, 10, 11]] * 2),
    (slice(0, 10), [[10, 11]] * 2),
    (torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool), [[2, 10, 11]] * 2),
])
def test_context_specs(llama, spec, kept):
    x = ids()
    p = extract(llama, x, context=spec)
    assert p.query_index.tolist() == kept
    assert p.position_ids.tolist() == kept                       # original positions by default
    assert torch.equal(p.query_ids, x.gather(1, p.query_index))
    assert max_diff(run_patched(llama, p), reference(llama, x, kept), p.valid) <= 1e-10


def test_per_row_mask_pads_and_stays_exact(llama):
    x = ids()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :9] = True
    mask[1, :5] = True
    p = extract(llama, x, context=mask)
    assert p.batch_shape == (2, 7)
    assert p.valid.sum(1).tolist() == [3, 7]
    assert all(float(v[~p.valid].abs().max()) == 0 for P in p.layers for v in P.tensors().values())
    assert max_diff(run_patched(llama, p), reference(llama, x, kept_positions(mask, 2, 12)), p.valid) <= 1e-10


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bert"])
def test_left_padding_float32(arch):
    """attention_mask with left padding (float32: HF float64 eager attention gives NaN on fully padded rows)."""
    m = tiny_model(arch, dtype=torch.float32)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    ctx = torch.zeros(2, 12, dtype=torch.bool)
    ctx[0, :8] = True
    ctx[1, 3:9] = True
    v = verify(m, ids(), context=ctx, attention_mask=am)
    assert v.num_query_tokens == 7
    assert v.max_abs_diff <= 1e-4 and v.control_max_abs_diff > CONTROL_MIN


def test_query_spec_and_default(llama):
    x = ids()
    q = torch.zeros(12, dtype=torch.bool)
    q[9:] = True
    p = extract(llama, x, query=q)
    assert p.query_index.tolist() == [[9, 10, 11]] * 2 and bool(p.context_mask[:, :9].all())
    p = extract(llama, x)                                       # default: last token is the query
    assert p.query_index.tolist() == [[11]] * 2


def test_bos_option(llama):
    x = ids()
    p = extract(llama, x, context=8, bos_is_context=False)
    assert p.query_index.tolist() == [[0, 8, 9, 10, 11]] * 2
    assert not bool(p.context_mask[:, 0].any())
    assert max_diff(run_patched(llama, p), reference(llama, x, kept_positions(8, 2, 12, bos_kept=True)),
                    p.valid) <= 1e-10


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_renumbered_positions(arch):
    m = tiny_model(arch)
    x = ids()
    p = extract(m, x, context=8, renumber_positions=True)
    assert p.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    assert max_diff(run_patched(m, p), reference(m, x, kept_positions(8, 2, 12)), p.valid) <= 1e-10


def test_bert_context_is_every_other_token():
    m = tiny_model("bert")
    x = ids()
    q = torch.zeros(12, dtype=torch.bool)
    q[4:7] = True
    v = verify(m, x, query=q)                                   # context: tokens before AND after the query
    assert v.max_abs_diff <= 1e-10 and v.control_max_abs_diff > CONTROL_MIN
    p = extract(m, x, query=q)
    assert p.context_mask[0].tolist() == [True] * 4 + [False] * 3 + [True] * 5


# --- patches as objects -------------------------------------------------------------------------
def test_applied_restores_model_exactly(llama):
    x = ids()
    p = extract(llama, x, context=8)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        plain_before = llama(p.query_ids, position_ids=p.position_ids).logits
        with p.applied(llama):
            patched = llama(p.query_ids, position_ids=p.position_ids).logits
        plain_after = llama(p.query_ids, position_ids=p.position_ids).logits
    ref = reference(llama, x, kept_positions(8, 2, 12))
    assert max_diff(patched, ref, p.valid) <= 1e-10
    assert max_diff(plain_before, ref, p.valid) > CONTROL_MIN
    assert torch.equal(plain_before, plain_after)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {}), ("gemma3", {}), ("gemma3", {"output_patch": "scale"}),
                                     ("mixtral", {}), ("bert", {})])
def test_save_load_bit_identical(tmp_path, arch, kw):
    m = tiny_model(arch)
    x = ids()
    p = extract(m, x, context=8, **kw)
    p.save(tmp_path / "p")
    q = ContextPatches.load(tmp_path / "p")
    assert q.meta == p.meta
    for a, b in zip(p.layers, q.layers, strict=True):
        a, b = a.tensors(), b.tensors()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for k in ("query_ids", "position_ids", "valid", "query_index", "context_mask"):
        assert torch.equal(getattr(p, k), getattr(q, k))
    out_p, out_q = run_patched(m, p), q.run(m)
    assert torch.equal(out_p, out_q)
    assert max_diff(out_q, reference(m, x, kept_positions(8, 2, 12)), q.valid) <= get_adapter(m).float64_floor
    assert not list((tmp_path / "p").glob("*.tmp"))           # atomic writes leave no temp files


def test_typed_patches_and_summary(llama):
    x = ids()
    p = extract(llama, x, context=8)
    lp = p.layer_patches(1)
    assert set(lp) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    W = llama.model.layers[1].mlp.gate_proj.weight
    assert lp["mlp.gate_proj"].shape == (2, 4) + tuple(W.shape)
    rows = p.summary()
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert all(r["dW_in"] > 0 and 0 < r["dW_in_rel"] and r["out"] == "weight" and r["d_out_rel"] > 0 for r in rows)
    assert all(t.dtype == torch.float64 for P in p.layers for t in P.tensors().values())
    p32 = extract(tiny_model("llama", dtype=torch.float32), x, context=8)
    assert all(t.dtype == torch.float32 for P in p32.layers for t in P.tensors().values())


def test_conv1d_patch_acts_like_the_transposed_weight():
    """GPT-2's c_fc patch (Linear orientation) maps the context-free z to the with-context z_C."""
    m = tiny_model("gpt2")
    x = ids()
    p = extract(m, x, context=8)
    lay = get_adapter(m).resolve(m)
    cap = capture_targets(m, x, p.query_index)
    layout = make_layout(x, 8)
    zs = {}

    def grab(mod, args):
        zs["z"] = args[0].detach()
    h = lay[0].mlp.register_forward_pre_hook(grab)
    try:
        with p.applied(m), torch.no_grad():
            m(p.query_ids, position_ids=p.position_ids)
    finally:
        h.remove()
    Ws = m.transformer.h[0].mlp.c_fc.weight.detach()         # (d_in, d_out)
    dW = p.layer_patches(0)["mlp.c_fc"].dense()              # (B, T_q, d_out, d_in)
    z, zc = zs["z"], cap.targets.z[0]
    lhs = z @ Ws + (dW @ z.unsqueeze(-1)).squeeze(-1)
    assert float((lhs - zc @ Ws).abs().max()) <= 1e-12
    assert torch.equal(layout.index, p.query_index)


# --- errors ---------------------------------------------------------------------------------------
def test_corrupted_truncated_and_missing_files(tmp_path, llama):
    p = extract(llama, ids(), context=8)
    d = p.save(tmp_path / "p")
    f = d / "patches.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PatchFileError, match="truncated or corrupted"):
        ContextPatches.load(d)
    f.write_bytes(raw[:-9] + bytes([raw[-9] ^ 0xFF]) + raw[-8:])
    with pytest.raises(PatchFileError, match="truncated or corrupted"):
        ContextPatches.load(d)
    f.write_bytes(raw)
    ContextPatches.load(d)
    (d / "patches.json").write_text("{not json")
    with pytest.raises(PatchFileError, match="not a valid"):
        ContextPatches.load(d)
    (d / "patches.json").unlink()
    with pytest.raises(PatchFileError, match="missing"):
        ContextPatches.load(d)


def test_json_says_what_is_in_the_tensor_file(tmp_path, llama):
    d = extract(llama, ids(), context=8).save(tmp_path / "p")
    meta = json.loads((d / "patches.json").read_text())
    assert meta["meta"]["family"] == "llama" and meta["meta"]["dtype"] == "torch.float64"
    assert "layer.0.in.mlp.gate_proj.V" in meta["tensors"] and meta["meta"]["num_layers"] == 3


def test_wrong_model(tmp_path, llama):
    p = extract(llama, ids(), context=8)
    with pytest.raises(PatchFileError, match="different model"):
        with p.applied(tiny_model("qwen2")):
            pass
    with pytest.raises(PatchFileError, match="different weights"):
        run_patched(tiny_model("llama", seed=1), p)
    q = ContextPatches.load(p.save(tmp_path / "p"))
    with pytest.raises(PatchFileError, match="config hash"):
        q.run(tiny_model("llama", overrides={"num_hidden_layers": 4}))


def test_unsupported_model():
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedModelError) as e:
        extract(m, ids(), context=8)
    assert all(f in str(e.value) for f in SUPPORTED_FAMILIES)
    with pytest.raises(UnsupportedModelError):
        get_adapter(types.SimpleNamespace(config=types.SimpleNamespace(model_type="nope")))


@pytest.mark.parametrize("kw,match", [
    (dict(context=0), "empty context"),
    (dict(context=12), "empty query"),
    (dict(context=torch.ones(5, dtype=torch.bool)), "shape"),
    (dict(context=torch.ones(12, dtype=torch.long)), "boolean"),
    (dict(context=(5, 2)), "span"),
    (dict(context=13), "outside"),
    (dict(context=8, query=torch.ones(12, dtype=torch.bool)), "overlap"),
    (dict(context=8, output_patch="bias"), "no bias"),
    (dict(context=8, output_patch="stable"), "post-MLP norm"),
    (dict(context=8, output_patch="nope"), "output_patch"),
])
def test_bad_input(llama, kw, match):
    with pytest.raises(ContextPatchError, match=match):
        extract(llama, ids(), **kw)


def test_bad_input_misc(llama):
    with pytest.raises(ContextPatchError, match="integer"):
        extract(llama, torch.rand(2, 12), context=8)
    with pytest.raises(DegenerateNormError, match="layer 0"):
        extract(llama, ids(), context=8, tol=1e6)
    llama.train()
    try:
        with pytest.raises(ContextPatchError, match="eval"):
            extract(llama, ids(), context=8)
    finally:
        llama.eval()
    with pytest.raises(ContextPatchError, match="scale"):
        extract(tiny_model("gemma3"), ids(), context=8, output_patch="weight")


# --- the two-step interface (the shared-context producers build on it) ------------------------------------------------
def test_targets_from_a_separate_capture_feed_the_patched_pass(llama):
    """Many queries against one shared context: rows share the context, targets come from one capture call."""
    ctx = ids(1, 8, seed=3).expand(3, 8)
    qs = ids(3, 4, seed=4)
    full = torch.cat([ctx, qs], 1)
    layout = make_layout(full, 8)
    cap = capture_targets(llama, full, layout.index, position_ids=layout.full_position_ids)
    assert len(cap.targets) == 3 and cap.targets.z[0].shape == (3, 4, 32) and cap.targets.r[0].shape == (3, 4, 32)
    res = patched_pass(llama, qs, cap.targets, position_ids=layout.position_ids)
    assert max_diff(res.output, cap.output, layout.valid) <= 1e-10
    assert res.layers[0].inputs["mlp.gate_proj"].V.shape == (3, 4, 32, 1)


# --- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "mixtral"])
def test_generation_without_context_equals_with_context(arch):
    m = tiny_model(arch)
    x = ids(1, 10, seed=1)
    r = generate(m, x, context=6, max_new_tokens=20)
    with torch.no_grad():
        ref = m.generate(x, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, 10:]
    assert r.tokens.shape == (1, 20)
    assert torch.equal(r.tokens, ref) and r.agree
    assert max(r.max_abs_diff) <= 1e-10


def test_generation_errors():
    with pytest.raises(ContextPatchError, match="causal"):
        generate(tiny_model("bert"), ids(1, 10), context=6)


# --- devices --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_accelerate_device_map(arch):
    """Layers dispatched by accelerate (hooks on every module); CPU-only here, device-agnostic code."""
    accelerate = pytest.importorskip("accelerate")
    m = tiny_model(arch)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": "cpu" for i in range(3)}}
    m = accelerate.dispatch_model(m, device_map=dm, main_device="cpu", force_hooks=True)
    assert hasattr(m.model.layers[0], "_hf_hook")
    v = verify(m, ids(), context=8)
    assert v.max_abs_diff <= 1e-10 and v.control_max_abs_diff > CONTROL_MIN
    if arch == "mixtral":  # the experts' forward override is undone, accelerate's wrapper is back in place
        assert "new_forward" in repr(m.model.layers[0].mlp.experts.forward)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda():
    m = tiny_model("llama", dtype=torch.float32, device="cuda")
    v = verify(m, ids().cuda(), context=8)
    assert v.max_abs_diff <= 1e-4 and v.control_max_abs_diff > CONTROL_MIN


def test_public_api():
    """The exact top-level surface (a snapshot): changing it is a deliberate, reviewed act."""
    assert sorted(cp.__all__) == sorted([
        "ContextPatchError", "DegenerateNormError", "PatchFileError", "UnsupportedModelError",
        "LowRankPatch", "token_patch", "OutputPatch", "SUPPORTED_FAMILIES",
        "extract", "verify", "run_patched", "generate", "ContextPatches",
        "extract_many", "extract_prefixes", "prefix_dynamics",
        "fit_static", "evaluate_static", "StaticPatches",
    ])
    assert all(hasattr(cp, n) for n in cp.__all__) and len(cp.__all__) <= 20


def test_no_import_cycles_inside_the_package():
    """Module-level imports between contextpatch modules form a DAG (no cycles, no function-level dodges)."""
    import ast
    from pathlib import Path

    root = Path(cp.__file__).parent
    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names]
                cands = subs if node.module is None else [target] + subs     # `from . import x` needs x only
                deps |= {c for c in cands if c in mods and c != name}
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2
    for n in graph:
        if n not in state:
            visit(n, [])


def test_kept_tokens_around_a_middle_context_span_attend_to_each_other():
    """HF reads a jump in position_ids (no mask) as a new packed sequence; the engine must not let it."""
    from contextpatch.engine._step2_patched import run_model

    model = tiny_model("gpt2", dtype=torch.float64, seed=1)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    kept = torch.cat([ids[:, :4], ids[:, 8:]], 1)
    pos = torch.cat([torch.arange(4), torch.arange(8, 12)])[None]
    with torch.no_grad():
        ours = run_model(model, get_adapter(model), kept, position_ids=pos).logits
        full = model(kept, attention_mask=torch.ones_like(kept), position_ids=pos).logits
        guessed = model(kept, position_ids=pos, use_cache=False).logits  # HF guesses two packed sequences
    assert torch.equal(ours, full)
    assert (ours[:, 4:] - guessed[:, 4:]).abs().max() > 1e-2   # control: the trap is real
    v = verify(model, ids, context=(4, 8))
    assert v.max_abs_diff <= 1e-12 and v.control_max_abs_diff > 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_bfloat16_models_use_float32_side_paths(arch):
    """bf16 weights: the patches are computed and applied in float32; the logits match to bf16 rounding."""
    model = tiny_model(arch, dtype=torch.bfloat16, seed=0)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    v = verify(model, ids, context=8)
    assert v.dtype == "bfloat16"
    assert v.max_abs_diff <= 0.1 and v.control_max_abs_diff > 20 * v.max_abs_diff
    assert all(t.dtype == torch.float32 for t in extract(model, ids, context=8).layers[0].tensors().values())


@settings(deadline=None)
@given(data=st.data())
def test_random_context_masks_property(data):
    """Any boolean context mask (per row, gaps anywhere, at least one context and one kept token) is exact."""
    arch = data.draw(st.sampled_from(["gpt2", "llama", "gemma3"]), label="arch")
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(2, 12), label="T")
    rows = []
    for _ in range(B):
        m = data.draw(st.lists(st.booleans(), min_size=T, max_size=T).filter(lambda r: any(r) and not all(r)))
        rows.append(m)
    mask = torch.tensor(rows)
    model = _model_cache(arch)
    ids = torch.randint(3, 100, (B, T), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    v = verify(model, ids, context=mask)
    assert v.max_abs_diff <= 1e-10, (arch, rows, v)
    # the control: a row whose removed tokens precede a kept one must change that kept token's output
    if any(any(r[:j]) and not r[j] for r in rows for j in range(T)):
        assert v.control_max_abs_diff > 1e-6


_MODELS: dict = {}


def _model_cache(arch):
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch, dtype=torch.float64, seed=5)
    return _MODELS[arch]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_rotated_capture_positions_are_caught(arch, monkeypatch):
    """Mutation check: a capture pass that reads the query positions rotated must make verify() (and the plain
    forward-pass reference of these tests) report a large difference."""
    import contextpatch.engine._extract as ex

    m = tiny_model(arch)
    x = ids()
    real = ex.capture_targets
    monkeypatch.setattr(ex, "capture_targets", lambda mod, i, index, **kw: real(mod, i, index.roll(1, dims=1), **kw))
    assert verify(m, x, context=8).max_abs_diff > CONTROL_MIN
    p = extract(m, x, context=8)
    assert max_diff(run_patched(m, p), reference(m, x, kept_positions(8, 2, 12)), p.valid) > CONTROL_MIN


def test_verify_reports_nan_in_the_model_as_an_error():
    m = tiny_model("llama")
    with torch.no_grad():
        m.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ContextPatchError, match="NaN"):
        verify(m, ids(), context=8)


def test_verify_names_hidden_states_of_a_bare_model():
    import transformers as tf

    m = tf.LlamaModel(tiny_model("llama").config).eval().double()
    v = verify(m, ids(), context=8)
    assert v.output == "last_hidden_state" and v.max_abs_diff <= 1e-10 and v.control_max_abs_diff > CONTROL_MIN


# --- model identity and file integrity (regressions: each of these was accepted silently before) ------------
def _edit_llama(kind: str):
    m = tiny_model("llama")
    with torch.no_grad():
        if kind == "o_proj x1.5":
            m.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
        elif kind == "up_proj negated":
            m.model.layers[1].mlp.up_proj.weight.neg_()
        elif kind == "odd gate_proj elements":
            m.model.layers[0].mlp.gate_proj.weight.view(-1)[1::2] += 0.01
        elif kind == ".data edit of the final norm":
            m.model.norm.weight.data.mul_(1.01)
        elif kind == "embedding row":
            m.model.embed_tokens.weight[7] += 1e-6
    return m


@pytest.mark.parametrize("kind", ["o_proj x1.5", "up_proj negated", "odd gate_proj elements",
                                  ".data edit of the final norm", "embedding row"])
def test_patches_refuse_a_partially_changed_model(kind, llama):
    p = extract(llama, ids(), context=8)
    edited = _edit_llama(kind)
    with pytest.raises(PatchFileError, match="different weights"):
        run_patched(edited, p)
    run_patched(tiny_model("llama"), p)                       # the same weights rebuilt: accepted


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["meta"].__setitem__("num_layers", 2), "edited|layers"),
    (lambda h: h["meta"].__setitem__("slot", "bias"), "edited|bias"),
    (lambda h: h["meta"].__setitem__("slot", "scale"), "edited|scale"),
    (lambda h: h["meta"].pop("slot"), "missing"),
    (lambda h: h["meta"].__setitem__("weight_fingerprint", "0" * 16), "edited"),
    (lambda h: h["meta"].__setitem__("num_layers", "3"), "wrong type"),
    (lambda h: h.pop("tensor_sha256"), "not a valid"),
])
def test_edited_metadata_is_refused(tmp_path, llama, edit, match):
    d = extract(llama, ids(), context=8).save(tmp_path / "p")
    header = json.loads((d / "patches.json").read_text())
    edit(header)
    (d / "patches.json").write_text(json.dumps(header))
    with pytest.raises(PatchFileError, match=match):
        ContextPatches.load(d)


def test_bad_model_inputs(llama):
    with pytest.raises(ContextPatchError, match="vocabulary"):
        extract(llama, torch.full((1, 12), 100), context=8)
    with pytest.raises(ContextPatchError, match="position_ids must have shape"):
        extract(llama, ids(), context=8, position_ids=torch.arange(11)[None])
    with pytest.raises(ContextPatchError, match="beyond the model's 64 positions"):
        extract(llama, torch.randint(3, 100, (1, 70)), context=8)
    with pytest.raises(ContextPatchError, match="beyond the model's 64 positions"):
        generate(llama, torch.randint(3, 100, (1, 60)), context=8, max_new_tokens=10)


def test_sequence_classification_heads_get_a_clear_error():
    import transformers as tf

    cfg = tiny_model("llama").config
    cfg.num_labels = 3
    m = tf.LlamaForSequenceClassification(cfg).eval()
    with pytest.raises(ContextPatchError, match="base model"):
        extract(m, ids(), context=8)
