"""``contextpatch dynamics``: per-layer implicit dynamics of a real model over the prefixes of its context."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import ContextPatchError
from .._io import atomic_write_json, ensure_out_dir, save_figure
from ._app import app, console, fail, print_json, print_table
from ._hf import (
    _ARCH,
    _CLEN,
    _CONTEXT,
    _DEVICE,
    _DTYPE,
    _JSON,
    _MODEL,
    _QLEN,
    _QUERY,
    _RANDOM,
    _SEED,
    DType,
    Family,
    _load,
)


def plot_dynamics(dyn, path: Path, *, token: int = -1) -> None:
    """One curve per layer: ‖ΔW_{i+1} − ΔW_i‖ (left) and ‖ΔW_i‖ (right) against context length i, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = dyn.prefix_lengths
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    L = dyn.num_layers
    for layer in range(L):
        c = cmap(layer / max(L - 1, 1))
        ax1.plot(x[:-1], dyn.step_norms[layer, :, token].clamp_min(1e-300), color=c, label=f"layer {layer}")
        ax2.plot(x, dyn.patch_norms[layer, :, token].clamp_min(1e-300), color=c, label=f"layer {layer}")
    for ax, ylabel in ((ax1, r"$\|\Delta W_{i+1} - \Delta W_i\|_F$"), (ax2, r"$\|\Delta W_i\|_F$")):
        ax.set_yscale("log")
        ax.set_xlabel("context length i (prefix c_1..c_i)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.set_title(f"marginal update per context token ({dyn.matrices[0]})")
    ax2.set_title("cumulative patch")
    ax2.legend(fontsize=7, ncol=2 if L > 8 else 1)
    fig.tight_layout()
    save_figure(fig, path)


@app.command("dynamics")
def dynamics_cmd(
    model: str = _MODEL, arch: Family = _ARCH, random: bool = _RANDOM, context: str = _CONTEXT, query: str = _QUERY,
    out: str = typer.Option(..., "--out", help="Directory for dynamics.json and dynamics.png."),
    context_len: int = _CLEN, query_len: int = typer.Option(1, "--query-len", help=_QLEN.help),
    dtype: DType = _DTYPE, device: str = _DEVICE, seed: int = _SEED,
    query_positions: str = typer.Option("prefix", help="prefix: the query follows c_1..c_i directly (the prompt "
                                                       "[c_1..c_i, x]); original: it keeps its position after C."),
    chunk_size: int = typer.Option(256, help="Prefix rows per packed context pass (bounds memory)."),
    json_out: bool = _JSON,
) -> None:
    """Per-layer ‖ΔW_i‖ and ‖ΔW_{i+1} − ΔW_i‖ over every prefix c_1..c_i of the context (one shared pass)."""
    from rich.progress import Progress

    from ..engine import prefix_dynamics

    inp = _load(model, arch, random, context, query, context_len, query_len, dtype, device, seed)
    ids = inp.input_ids[0]
    ctx, q = ids[:inp.n_context], ids[inp.n_context:]
    try:
        outdir = ensure_out_dir(out)
        with Progress(transient=True, disable=json_out) as bar:
            task = bar.add_task("prefix passes", total=len(ctx))
            dyn = prefix_dynamics(inp.model, ctx, q, query_positions=query_positions, chunk_size=chunk_size,
                                  progress=lambda r: bar.advance(task, r))
    except ContextPatchError as e:
        fail(str(e))
    result = dyn.to_dict()
    result.update(arch=inp.arch, dtype=dtype, seed=seed, context_ids=ctx.tolist(), query_ids=q.tolist())
    atomic_write_json(outdir / "dynamics.json", result)
    plot_dynamics(dyn, outdir / "dynamics.png")
    if json_out:
        print_json({k: result[k] for k in ("arch", "dtype", "seed", "prefix_lengths", "matrices",
                                           "step_last_over_first", "step_norms", "patch_norms")})
        return
    rows = [[layer, dyn.matrices[layer], float(dyn.patch_norms[layer, 0, -1]), float(dyn.patch_norms[layer, -1, -1]),
             float(dyn.step_norms[layer, 0, -1]) if dyn.step_norms.shape[1] else float("nan"),
             float(dyn.step_norms[layer, -1, -1]) if dyn.step_norms.shape[1] else float("nan")]
            for layer in range(dyn.num_layers)]
    print_table(f"implicit dynamics over {len(ctx)} prefixes ({inp.arch}, {dtype})",
                ["layer", "matrix", "‖ΔW_1‖", "‖ΔW_n‖", "‖ΔW_2−ΔW_1‖", "‖ΔW_n−ΔW_n−1‖"], rows)
    console.print(f"wrote {outdir / 'dynamics.json'} and {outdir / 'dynamics.png'}")
