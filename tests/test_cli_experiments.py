"""CLI: reproduce --preset quick --json, help on every experiment command, clear errors."""

import json

import pytest
from typer.testing import CliRunner

from contextpatch.cli import app

runner = CliRunner()


def test_reproduce_quick_json(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["reproduce", "--preset", "quick", "--out", str(out), "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"mean_abs_diff", "max_abs_diff"} <= data["equivalence"].keys()
    assert {"mse_with_context", "mse_without_context"} <= data["icl"].keys()
    assert "alignment_mean" in data["finetune"]
    assert {"attention_last_over_first", "rnn_last_over_first"} <= data["convergence"].keys()
    assert "test_mse_by_K" in data["thought_patch"]
    assert data["out"] == str(out)
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()


@pytest.mark.parametrize("cmd", [["reproduce"], ["train"], ["experiment"], ["experiment", "equivalence"],
                                 ["experiment", "finetune"], ["experiment", "convergence"],
                                 ["experiment", "thought-patch"]])
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


@pytest.mark.parametrize("args,msg", [
    (["reproduce", "--preset", "huge"], "unknown preset"),
    (["train", "--model", "lstm"], "unknown model"),
    (["train", "--preset", "nope"], "unknown preset"),
    (["experiment", "equivalence", "--checkpoints", "/nonexistent/dir"], "incomplete"),
])
def test_bad_input(args, msg, tmp_path):
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert "Traceback" not in res.output


def test_unwritable_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = runner.invoke(app, ["experiment", "convergence", "--preset", "quick", "--out", str(f / "sub")])
    assert res.exit_code == 2 and "not writable" in res.output
