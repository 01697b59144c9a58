"""``contextpatch verify-block``: the paper's theorem on a random block, with the unpatched control."""

from __future__ import annotations

import typer

from .._errors import ContextPatchError
from .._verify import verify_random_block
from ._app import app, console, fail, print_json


@app.command("verify-block")
def verify_block(
    layer: str = typer.Option("softmax", help="Contextual layer: softmax, linear or rnn."),
    d_model: int = typer.Option(8, help="Token width d_in."),
    n_heads: int = typer.Option(2, help="Attention heads (softmax/linear)."),
    d_hidden: int = typer.Option(32, help="MLP hidden width (rows of W)."),
    n_context: int = typer.Option(16, help="Context length n."),
    n_layers: int = typer.Option(0, help="0: one contextual block (paper Thm 2.2); L ≥ 1: Pre-LN stack of L blocks."),
    remove: str = typer.Option("", help="Sub-context Y as comma-separated indices into C (default: all of C)."),
    batch: int = typer.Option(4, help="Random (context, query) pairs."),
    seed: int = typer.Option(0, help="Random seed (weights and tokens)."),
    dtype: str = typer.Option("float64", help="float32 or float64."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Build a random block, patch it, and print |T_W(C,x) − T_{W+ΔW}(C∖Y,x)|, the control and ‖ΔW‖."""
    try:
        rm = [int(t) for t in remove.split(",") if t.strip()] if remove.strip() else None
    except ValueError:
        fail(f"--remove must be comma-separated integers, got {remove!r}")
    try:
        r = verify_random_block(layer=layer, d_model=d_model, n_heads=n_heads, d_hidden=d_hidden,
                                n_context=n_context, n_layers=n_layers, remove=rm, batch=batch, seed=seed,
                                dtype=dtype)
    except ContextPatchError as e:
        fail(str(e))
    if json_out:
        print_json(r.to_dict())
        return
    what = "contextual block" if n_layers == 0 else f"Pre-LN stack of {n_layers} blocks"
    console.print(f"{layer} {what}, n_context={n_context}, removed {r.removed}, {dtype}, seed {seed}")
    console.print(f"  max |T_W(C,x) − T_(W+ΔW)(C∖Y,x)| = {r.max_abs_diff:.3e}  (relative {r.rel_diff:.3e})")
    console.print(f"  control |T_W(C,x) − T_W(C∖Y,x)|   = {r.control_max_abs_diff:.3e}")
    console.print(f"  ‖ΔW‖_F (largest)                  = {r.patch_norm:.3e}")
