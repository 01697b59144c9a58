"""Build a random contextual block (or Pre-LN stack), patch it, and measure the equivalence."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ._errors import ContextPatchError
from .blocks import MLP, ContextualBlock, PreLNStack, extract_patches, make_layer, run_blocks, subcontext_mask

__all__ = ["BlockCheck", "verify_random_block"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class BlockCheck:
    """Result of :func:`verify_random_block` (all maxima over batch, kept positions and features)."""

    max_abs_diff: float          # |T_W(C, x) − T_{W+ΔW}(C∖Y, x)|
    rel_diff: float              # max_abs_diff / max |T_W(C, x)|
    control_max_abs_diff: float  # |T_W(C, x) − T_W(C∖Y, x)|, the unpatched difference
    patch_norm: float            # max ‖ΔW‖_F over blocks and positions (last position only if last_only)
    layer: str
    n_layers: int
    n_context: int
    removed: int
    dtype: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def verify_random_block(*, layer: str = "softmax", d_model: int = 8, n_heads: int = 2, d_hidden: int = 32,
                        n_context: int = 16, n_layers: int = 0, remove: list[int] | None = None,
                        batch: int = 4, seed: int = 0, dtype: str = "float64") -> BlockCheck:
    """Random block with n_layers = 0 (the paper's T_W = M_W ∘ A) or a Pre-LN stack of n_layers blocks.

    The context C is n_context random tokens, the query one more; Y = ``remove`` (default: all of C).
    Patches are extracted at every kept position; the numbers are measured at the query (last) position.
    """
    if dtype not in DTYPES:
        raise ContextPatchError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if n_context < 1:
        raise ContextPatchError("n_context must be ≥ 1: an empty context has no patch")
    if n_layers < 0:
        raise ContextPatchError("n_layers must be ≥ 0")
    torch.manual_seed(seed)
    if n_layers == 0:
        blocks = [ContextualBlock(layer=make_layer(layer, d_model=d_model, n_heads=n_heads),
                                  mlp=MLP(d_in=d_model, d_hidden=d_hidden))]
    else:
        blocks = list(PreLNStack(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_hidden=d_hidden,
                                 layer=layer).blocks)
        for b in blocks:  # randomise the LayerNorm gains and biases so the norms are exercised
            for ln in (b.ln1, b.ln2):
                torch.nn.init.normal_(ln.weight, 1.0, 0.3)
                torch.nn.init.normal_(ln.bias, 0.0, 0.3)
    dt = DTYPES[dtype]
    blocks = [b.to(dt) for b in blocks]
    tokens = torch.randn(batch, n_context + 1, d_model, dtype=dt)
    keep = subcontext_mask(n_context, remove)
    with torch.no_grad():
        patches = extract_patches(blocks, tokens, keep)
        ref = run_blocks(blocks, tokens)[..., keep, :][..., -1, :]
        patched = run_blocks(blocks, tokens[..., keep, :], patches)[..., -1, :]
        unpatched = run_blocks(blocks, tokens[..., keep, :])[..., -1, :]
    diff = float((ref - patched).abs().max())
    return BlockCheck(
        max_abs_diff=diff,
        rel_diff=diff / float(ref.abs().max()),
        control_max_abs_diff=float((ref - unpatched).abs().max()),
        patch_norm=float(max(p.weight[..., -1].norm().max() for p in patches)),
        layer=layer, n_layers=n_layers, n_context=n_context, removed=int((~keep).sum()),
        dtype=dtype, seed=seed)
