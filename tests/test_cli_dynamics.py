"""CLI: ``contextpatch dynamics`` writes JSON and a plot, and its numbers equal the library's."""

import json

import torch
from typer.testing import CliRunner

from contextpatch.adapters import tiny_model
from contextpatch.cli import app
from contextpatch.engine import dynamics_from_patches, extract_prefixes_naive

runner = CliRunner()


def test_dynamics_cli_json_and_files(tmp_path):
    res = runner.invoke(app, ["dynamics", "--arch", "gpt2", "--random", "--context", "5,17,42,8,9,60",
                              "--query", "33", "--dtype", "float64", "--out", str(tmp_path), "--json",
                              "--chunk-size", "4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["prefix_lengths"] == [1, 2, 3, 4, 5, 6] and len(out["step_norms"]) == 3
    assert (tmp_path / "dynamics.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "dynamics.json").read_text())
    assert saved["seed"] == 0 and saved["context_ids"] == [5, 17, 42, 8, 9, 60]
    # same numbers as the naive reference (one extract per prefix)
    model = tiny_model("gpt2", dtype=torch.float64, seed=0)
    ref = dynamics_from_patches(extract_prefixes_naive(model, torch.tensor([5, 17, 42, 8, 9, 60]), torch.tensor([33])))
    got = torch.tensor(out["step_norms"], dtype=torch.float64)
    assert torch.allclose(got, ref.step_norms[..., -1], atol=1e-12)
    assert float(got.max()) > 1e-2


def test_dynamics_cli_bad_input(tmp_path):
    res = runner.invoke(app, ["dynamics", "--arch", "bert", "--random", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "causal" in res.output
    res = runner.invoke(app, ["dynamics", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--model" in res.output
    assert runner.invoke(app, ["dynamics", "--help"]).exit_code == 0
