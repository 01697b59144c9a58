"""contextpatch.zoo: task generators, tokenizer, training (loss, resume), registry errors, evaluation shape."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from contextpatch import ContextPatchError
from contextpatch.zoo import evaluate, list_models, make_tokenizer, path, train
from contextpatch.zoo.data import sample_batch
from contextpatch.zoo.tasks import FactsTask, FunctionTask, InstructionTask, vocabulary
from contextpatch.zoo.tokenizer import encode_words
from contextpatch.zoo.train import TrainConfig, loss_fn

TINY = TrainConfig(name="tiny", arch="llama", width=32, layers=1, steps=6, batch_size=4, warmup_steps=2,
                   max_shots=4, curriculum_start=2, queries=2)


class _Stop(Exception):
    """Raised by the callback of :func:`_stop_at` to interrupt a training run."""


def _stop_at(n: int):
    """An ``on_step`` callback that interrupts training after step ``n`` (a checkpoint written at n survives)."""
    def on_step(step, _loss):
        if step == n:
            raise _Stop
    return on_step


def _pairs(line: str, sep: str) -> list[tuple[list[str], list[str]]]:
    out = []
    for item in line.split(";"):
        if item.strip():
            q, a = item.split(sep)
            out.append((q.split(), a.split()))
    return out


@pytest.mark.parametrize("task", [FunctionTask(), FactsTask(), InstructionTask()])
def test_generators_are_deterministic_per_seed(task):
    a = [task.sample(np.random.default_rng(7), k, n_queries=3) for k in (0, 3, 9)]
    b = [task.sample(np.random.default_rng(7), k, n_queries=3) for k in (0, 3, 9)]
    c = [task.sample(np.random.default_rng(8), k, n_queries=3) for k in (0, 3, 9)]
    assert a == b and a != c
    assert all(w in vocabulary() for ex in a for w in ex.text().split())


def test_function_answers_follow_one_affine_rule_and_are_not_copied():
    task = FunctionTask(p=13, slopes=(1, 12), noise=0.2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ex = task.sample(rng, 24, n_queries=3)
        demos = [(int(q[0]), int(a[0])) for q, a in _pairs(ex.context, "->")]
        queries = [(int(q.split()[0]), int(a)) for q, a in ex.pairs]
        # independent check: some rule (a, b) fits every query and at least the clean demonstrations
        fits = [(a, b) for a in (1, 12) for b in range(13) if all((a * x + b) % 13 == y for x, y in queries)]
        assert fits
        a, b = max(fits, key=lambda r: sum((r[0] * x + r[1]) % 13 == y for x, y in demos))
        clean = [(a * x + b) % 13 == y for x, y in demos]
        assert clean == [c for _, _, c in ex.demos]
        assert {x for x, _ in queries}.isdisjoint(x for x, _ in demos)  # answers never copied from a demo
    assert task.chance() == pytest.approx(1 / 13)


def test_facts_answers_are_the_context_values():
    rng = np.random.default_rng(1)
    for k in (1, 5, 32):
        ex = FactsTask().sample(rng, k, n_queries=4)
        facts = dict(item.split() for item in ex.context.split(";") if item.strip())
        assert len(facts) == k
        assert all(facts[q] == a for q, a in ex.pairs)


def test_instruction_answers_follow_the_mode():
    rng = np.random.default_rng(2)
    for _ in range(40):
        ex = InstructionTask().sample(rng, 3, n_queries=3)
        mode = ex.context.split(";")[0].split(" ", 1)[1].strip()
        for q, a in ex.pairs + [(q, a) for q, a, _ in ex.demos]:
            xs = [int(t) for t in q.split()[:-1]]
            want = {"sort": sorted(xs), "reverse": xs[::-1], "rotate": xs[1:] + xs[:1]}.get(mode)
            if want is None:
                want = [(x + int(mode.split()[1])) % 10 for x in xs]
            assert [int(t) for t in a.split()] == want


def test_copy_warmup_repeats_its_sequence():
    from contextpatch.zoo.tasks import CopyTask

    ex = CopyTask().sample(np.random.default_rng(4), 0)
    first = ex.context.split()[:-1]
    (q, a), = ex.pairs
    assert [q, *a.split()] == first and ex.text().split() == first + [";"] + first + [";"]


def test_lag_warmup_targets_the_token_before_the_previous_one():
    from contextpatch.zoo.data import encode_example
    from contextpatch.zoo.tasks import LagTask

    ex = LagTask().sample(np.random.default_rng(5), 0, n_queries=12)
    ids, w = encode_example(ex)
    targets = [t for t, wt in enumerate(w) if wt]
    assert len(targets) == 12
    assert all(ids[t] == ids[t - 2] for t in targets)          # the target repeats the word two back
    semicolon, = encode_words(";", bos=False)
    assert all(ids[t + 1] == semicolon for t in targets)      # each group ends after its target
    assert len({(t - targets[0]) % 4 for t in targets}) > 1    # groups of 2-4 words: the phase moves
    sizes = {len(q.split()) for q, _ in ex.pairs}
    assert sizes <= {2, 3, 4} and len(sizes) > 1


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = make_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ex = InstructionTask().sample(np.random.default_rng(3), 2, n_queries=2)
    for text in (ex.text(), "k3 v7 ; k3 v7 ;", "4 -> 9 ;"):
        ids = tok2(text).input_ids
        assert ids == encode_words(text) == tok(text).input_ids
        assert tok2.decode(ids, skip_special_tokens=True) == text
    assert len(tok2) == len(vocabulary())


def test_tiny_model_loss_decreases():
    torch.manual_seed(0)
    cfg = replace(TINY, steps=40, lr=3e-3, width=48)
    from contextpatch.zoo.train import _make

    model, opt = _make(cfg)
    ids, w = sample_batch(cfg, 0)
    first = float(loss_fn(model, ids, w).detach())
    for _ in range(40):  # fit one fixed batch: the loss must fall
        loss = loss_fn(model, ids, w)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss_fn(model, ids, w).detach()) < 0.7 * first


def test_resume_is_bit_exact_and_refuses_another_config(tmp_path):
    straight = train(TINY, tmp_path / "a", progress=False, eval_examples=0)
    train(replace(TINY, steps=3), tmp_path / "b", progress=False, eval_examples=0)
    # the 3-step checkpoint has another config: clear error naming the field
    with pytest.raises(ContextPatchError, match="steps"):
        train(TINY, tmp_path / "b", resume=True, progress=False, eval_examples=0)
    # same config, interrupted after 3 steps (checkpoint_every=3 and a stop), then resumed
    with pytest.raises(_Stop):
        train(TINY, tmp_path / "c", progress=False, eval_examples=0, checkpoint_every=3, on_step=_stop_at(3))
    resumed = train(TINY, tmp_path / "c", resume=True, progress=False, eval_examples=0)
    assert resumed["steps"] == straight["steps"] == 6
    from safetensors.torch import load_file

    sa, sc = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ContextPatchError, match="no checkpoint"):
        train(TINY, tmp_path / "d", resume=True, progress=False)


def test_a_checkpoint_from_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    from contextpatch.zoo.train import checkpoint_model

    cfg = replace(TINY, steps=4)
    with pytest.raises(_Stop):
        train(cfg, tmp_path / "a", progress=False, eval_examples=0, checkpoint_every=2, on_step=_stop_at(2))
    state_path = tmp_path / "a" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    for key in ("teacher", "attn_weight", "logit_weight"):       # fields added after the first checkpoints
        del state["config"][key]
    torch.save(state, state_path)
    meta = train(cfg, tmp_path / "a", resume=True, progress=False, eval_examples=0)
    assert meta["steps_done"] == 4 and checkpoint_model(tmp_path / "a")[1]["step"] == 4


def test_registry_errors_list_available_models():
    assert list_models() == ["icl-gpt2", "icl-llama", "icl-llama-induction"]
    with pytest.raises(ContextPatchError, match="icl-gpt2, icl-llama, icl-llama-induction"):
        path("icl-nope")


def test_eval_json_shape_and_cli(tmp_path):
    from typer.testing import CliRunner

    from contextpatch.cli import app

    meta = train(replace(TINY, steps=2), tmp_path / "m", progress=False, eval_examples=0)
    assert meta["parameters"] > 0 and json.loads((tmp_path / "m" / "zoo.json").read_text())["name"] == "tiny"
    res = evaluate(tmp_path / "m", n=3, out=tmp_path / "ev")
    assert set(res) == {"model", "families"} and res["model"] == "tiny"
    assert set(res["families"]) == {"function", "facts", "instruction"}
    for r in res["families"].values():
        assert set(r) == {"with_context", "without_context", "chance", "by_shots"}
        assert all(0.0 <= v <= 1.0 for v in [r["with_context"], r["without_context"], *r["by_shots"].values()])
    assert (tmp_path / "ev" / "accuracy.png").stat().st_size > 0
    run = CliRunner().invoke(app, ["zoo", "eval", str(tmp_path / "m"), "--json", "--examples", "2"])
    assert run.exit_code == 0, run.output
    assert set(json.loads(run.stdout)["families"]["facts"]["by_shots"]) == {"1", "2", "4", "8", "16", "32"}
    # not a zoo model: one clear error, no traceback
    (tmp_path / "m" / "zoo.json").unlink()
    run = CliRunner().invoke(app, ["zoo", "eval", str(tmp_path / "m")])
    flat = " ".join(run.output.split())  # rich wraps long lines
    assert run.exit_code == 2 and "not a zoo model" in flat and "Traceback" not in flat
    run = CliRunner().invoke(app, ["zoo", "eval", "icl-nope"])
    assert run.exit_code == 2 and "icl-gpt2, icl-llama" in " ".join(run.output.split())
    for cmd in (["zoo", "--help"], ["zoo", "list", "--help"], ["zoo", "train", "--help"], ["zoo", "eval", "--help"]):
        assert CliRunner().invoke(app, cmd).exit_code == 0


def test_gpt2_twin_builds_with_4096_positions():
    from contextpatch.zoo.models import make_config

    assert make_config("gpt2").n_positions == 4096 and make_config("llama").max_position_embeddings == 4096
    with pytest.raises(ContextPatchError, match="llama, gpt2"):
        make_config("bert")


def test_sinusoid_position_init_follows_the_formula_and_is_gpt2_only():
    """position_init='sinusoid': GPT-2's learned positions start at sin/cos(p / 10000^(2i/d)) (entries recomputed
    with math here), each row scaled to the token embeddings' mean row norm; Llama (RoPE) refuses it."""
    import math

    from contextpatch.zoo.train import _make

    cfg = TrainConfig(arch="gpt2", width=16, layers=1, heads=2, position_init="sinusoid")
    model, _ = _make(cfg)
    wpe, wte = model.transformer.wpe.weight.detach(), model.transformer.wte.weight.detach()
    c = float(wte.norm(dim=-1).mean()) / math.sqrt(8)
    for p_, i in [(0, 0), (5, 2), (4095, 7), (123, 0)]:
        assert float(wpe[p_, 2 * i]) == pytest.approx(c * math.sin(p_ / 10000 ** (2 * i / 16)), abs=1e-6)
        assert float(wpe[p_, 2 * i + 1]) == pytest.approx(c * math.cos(p_ / 10000 ** (2 * i / 16)), abs=1e-6)
    plain, _ = _make(replace(cfg, position_init="normal"))
    assert float((plain.transformer.wpe.weight.detach() - wpe).abs().max()) > 1e-2   # control: the default differs
    with pytest.raises(ContextPatchError, match="RoPE"):
        _make(replace(cfg, arch="llama"))
    with pytest.raises(ContextPatchError, match="position_init"):
        _make(replace(cfg, position_init="learned"))


@pytest.mark.parametrize("name", ["icl-llama", "icl-llama-induction", "icl-gpt2"])
def test_shipped_model_loads_with_plain_transformers_and_reproduces_its_accuracy(name):
    """The shipped folder is a standard HF checkpoint (AutoModel/AutoTokenizer, no contextpatch code), its
    tokenizer is the zoo's word map, and re-evaluating it with zoo.json's seed gives zoo.json's numbers."""
    from contextpatch.zoo.registry import MODELS_DIR

    if not (MODELS_DIR / name / "zoo.json").is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contextpatch.zoo import evaluate_model

    folder = path(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = "mode: reverse ; 4 1 9 => 9 1 4 ; k3 v7 ; 3 -> 4 ;"
    assert tok(text)["input_ids"] == encode_words(text) and tok.decode(encode_words(text)[1:]) == text
    assert (model.config.max_position_embeddings if "llama" in name else model.config.n_positions) == 4096
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["name"] == name              # `zoo eval NAME --json` and the study report this name
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert (folder / "model.safetensors").stat().st_size < 15 * 2**20
    want = meta["metrics"]
    got = evaluate_model(model, name=meta["name"], n=meta.get("eval_examples", 50),
                         config=TrainConfig.from_dict(meta["config"]))
    for fam, r in want["families"].items():
        assert got["families"][fam]["by_shots"] == {int(k): v for k, v in r["by_shots"].items()}, fam


def test_second_phase_starts_from_a_trained_folder_and_records_it(tmp_path):
    """init_from copies the parent's weights (step-0 loss equals the parent's final loss on the same batch),
    zoo.json records the parent and the total wall time; overrides are parsed and bad ones refused."""
    first = train(replace(TINY, steps=5), tmp_path / "a", progress=False, eval_examples=0)
    cfg = TINY.with_overrides(["steps=3", "lr=1e-3", "mix=facts:0.5,copy:0.5", f"init_from={tmp_path / 'a'}"])
    assert cfg.mix == (("facts", 0.5), ("copy", 0.5)) and cfg.lr == 1e-3 and cfg.steps == 3
    from contextpatch.zoo.evaluate import load_zoo_model

    parent, _ = load_zoo_model(tmp_path / "a")
    losses = []
    meta = train(cfg, tmp_path / "b", progress=False, eval_examples=0, on_step=lambda s, v: losses.append(v))
    ids, w = sample_batch(cfg, 0)
    parent.train()
    with torch.no_grad():
        assert abs(losses[0] - float(loss_fn(parent, ids, w))) < 1e-5   # step 0 ran on the parent's weights
    assert meta["parent"]["steps"] == 5 and meta["total_wall_seconds"] >= first["wall_seconds"]
    for bad in (["nope=1"], ["lr"], ["steps=x"], ["name=other"]):
        with pytest.raises(ContextPatchError, match="--set"):
            TINY.with_overrides(bad)
    with pytest.raises(ContextPatchError, match="not a zoo model folder"):
        train(replace(TINY, init_from=str(tmp_path)), tmp_path / "c", progress=False, eval_examples=0)
    with pytest.raises(ContextPatchError, match="another architecture"):
        train(replace(TINY, width=48, init_from=str(tmp_path / "a")), tmp_path / "d", progress=False, eval_examples=0)


def test_finish_from_checkpoint_records_where_an_interrupted_run_stopped(tmp_path):
    from contextpatch.zoo.train import checkpoint_model, finish_from_checkpoint

    with pytest.raises(_Stop):
        train(replace(TINY, steps=10), tmp_path / "r", progress=False, checkpoint_every=2, on_step=_stop_at(4))
    model, info = checkpoint_model(tmp_path / "r")
    assert info["step"] == 4
    meta = finish_from_checkpoint(tmp_path / "r", eval_examples=0)
    assert meta["steps"] == 10 and meta["steps_done"] == 4
    from contextpatch.zoo.evaluate import load_zoo_model

    saved, _ = load_zoo_model(tmp_path / "r")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values(), strict=True))
    # the same run ended by stop_at (reproducible from the CLI: --set stop_at=4) gives the same weights
    meta2 = train(replace(TINY, steps=10, stop_at=4), tmp_path / "s", progress=False, eval_examples=0)
    again, _ = load_zoo_model(tmp_path / "s")
    assert meta2["steps_done"] == 4 and meta2["steps"] == 10
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_training_curve_offsets_later_phases_and_plots(tmp_path):
    from contextpatch.zoo.evaluate import plot_training, training_curve

    p1 = {"steps": 6000, "steps_done": 30, "loss_history": [[10, 3.0, 1.0], [20, 2.0, 2.0], [30, 1.5, 3.0]]}
    p2 = {"steps": 20, "steps_done": 20, "loss_history": [[10, 1.0, 1.0], [20, 0.5, 2.0]]}
    steps, losses, starts = training_curve([p1, p2])
    assert steps == [10, 20, 30, 40, 50] and losses == [3.0, 2.0, 1.5, 1.0, 0.5] and starts == [0, 30]
    plot_training({"two phases": [p1, p2]}, tmp_path / "loss.png", smooth=2)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def _attn_kl_reference(teacher, student, ids):
    """Mean KL(teacher ‖ student) of the attention rows over layers, heads and real query rows, with
    torch.nn.functional.kl_div (an independent formula for the attention-transfer term)."""
    real = ids != 0
    with torch.no_grad():
        a_t = teacher(input_ids=ids, output_attentions=True).attentions
        a_s = student(input_ids=ids, output_attentions=True).attentions
    per_layer = []
    for t, s in zip(a_t, a_s, strict=True):
        kl = torch.nn.functional.kl_div(s.double().clamp_min(1e-12).log(), t.double(), reduction="none").sum(-1)
        per_layer.append(kl.mean(1)[real].mean())
    return float(torch.stack(per_layer).mean())


def test_teacher_distillation_terms_vanish_on_the_teacher_itself_and_train_the_attention(tmp_path):
    """distill_loss on the teacher's own weights is the answer loss (both KL terms 0); on a GPT-2 student its
    attention term equals an independent kl_div, and a few steps of training with the teacher lower it."""
    from contextpatch.zoo.evaluate import load_zoo_model
    from contextpatch.zoo.teacher import distill_loss, load_teacher

    train(replace(TINY, steps=4), tmp_path / "t", progress=False, eval_examples=0)
    sharpen, _ = load_zoo_model(tmp_path / "t")           # a teacher with far-from-uniform attention rows
    with torch.no_grad():
        sharpen.model.layers[0].self_attn.q_proj.weight.mul_(60.0)
    sharpen.save_pretrained(tmp_path / "t")
    teacher = load_teacher(str(tmp_path / "t"), load_zoo_model(tmp_path / "t")[0])
    ids, w = sample_batch(TINY, 0)
    same, _ = load_zoo_model(tmp_path / "t")
    same.set_attn_implementation("eager")
    with torch.no_grad():
        loss, parts = distill_loss(same, teacher, ids, w, attn_weight=1.0, logit_weight=1.0)
        assert parts["attn_kl"] < 1e-6 and parts["logit_kl"] < 1e-6
        assert abs(float(loss) - float(loss_fn(same, ids, w))) < 1e-5

    cfg = replace(TINY, name="tiny-gpt2", arch="gpt2", teacher=str(tmp_path / "t"), steps=40, lr=1e-2,
                  attn_weight=1.0, logit_weight=0.0)
    from contextpatch.zoo.models import make_model

    fresh = make_model("gpt2", seed=cfg.seed, width=32, layers=1, heads=1).eval()
    fresh.set_attn_implementation("eager")
    with torch.no_grad():
        _, parts = distill_loss(fresh, teacher, ids, w, attn_weight=1.0, logit_weight=0.0)
    before = _attn_kl_reference(teacher, fresh, ids)
    assert abs(parts["attn_kl"] - before) < 1e-5 and before > 1e-2
    train(cfg, tmp_path / "s", progress=False, eval_examples=0)
    train(replace(cfg, teacher=None), tmp_path / "control", progress=False, eval_examples=0)
    taught = _attn_kl_reference(teacher, load_zoo_model(tmp_path / "s")[0], ids)
    control = _attn_kl_reference(teacher, load_zoo_model(tmp_path / "control")[0], ids)
    assert taught < 0.9 * before and taught < 0.75 * control
    with pytest.raises(ContextPatchError, match="layers and heads"):
        train(replace(cfg, layers=2), tmp_path / "x", progress=False, eval_examples=0)
    with pytest.raises(ContextPatchError, match="neither a zoo model folder"):
        train(replace(cfg, teacher=str(tmp_path)), tmp_path / "y", progress=False, eval_examples=0)
    by_name = load_teacher("icl-llama", make_model("llama", seed=0, width=128, layers=4, heads=4))
    assert by_name.config.hidden_size == 128 and not by_name.training
