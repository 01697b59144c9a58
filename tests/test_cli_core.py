"""CLI: verify-block prints the equivalence, the control and ‖ΔW‖; bad input gives one clear message."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from contextpatch.cli import app

runner = CliRunner()


@pytest.mark.parametrize("layer", ["softmax", "linear", "rnn"])
def test_verify_block_json(layer):
    res = runner.invoke(app, ["verify-block", "--layer", layer, "--json", "--n-context", "8"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"max_abs_diff", "control_max_abs_diff", "patch_norm", "seed", "dtype"} <= out.keys()
    assert out["max_abs_diff"] < 1e-12 < 1e-2 < out["control_max_abs_diff"]


def test_verify_block_text_and_stack():
    res = runner.invoke(app, ["verify-block", "--n-layers", "3", "--dtype", "float32", "--remove", "0,2"])
    assert res.exit_code == 0, res.output
    assert "control" in res.stdout and "Pre-LN stack of 3" in res.stdout


@pytest.mark.parametrize("args,msg", [
    (["--layer", "lstm"], "unknown contextual layer"),
    (["--remove", "0,99"], "not a subset"),
    (["--remove", "a"], "comma-separated"),
    (["--n-context", "0"], "empty context"),
    (["--dtype", "float16"], "dtype must be"),
])
def test_verify_block_bad_input(args, msg):
    res = runner.invoke(app, ["verify-block", *args])
    assert res.exit_code == 2
    assert msg in res.output
    assert "Traceback" not in res.output


def test_help_everywhere():
    assert runner.invoke(app, ["--help"]).exit_code == 0
    assert "control" in runner.invoke(app, ["verify-block", "--help"]).stdout


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "contextpatch 0.2.0" in res.stdout


def run_piped(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with stdout and stderr piped, as in a script or a CI log."""
    return subprocess.run([sys.executable, "-m", "contextpatch.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_error_is_one_line_when_piped():
    """A long message is not wrapped at rich's 80 columns when stderr is not a terminal."""
    res = run_piped("verify-block", "--layer", "x" * 100)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown contextual layer") and "x" * 100 in lines[0], lines


def test_usage_error_is_plain_when_piped():
    """A typer/click usage error (unknown option) is plain text, no rich box, when stderr is not a terminal."""
    res = run_piped("study", "--bogus")
    assert res.returncode == 2
    assert "Error: No such option: --bogus" in res.stderr and "╭" not in res.stderr and "│" not in res.stderr
