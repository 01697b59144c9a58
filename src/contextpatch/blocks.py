"""The paper's objects as torch modules: contextual layers, the MLP, contextual blocks, Pre-LN stacks.

A **contextual layer** maps a token sequence (..., n, d_in) to outputs (..., n, d); A(C, x) is its output
at the position of the query x, the last token of [C, x]. Any ``nn.Module`` (or callable) with that
signature follows the protocol: :func:`context_outputs` evaluates A(C, x) and A(C∖Y, x) for it.

A **contextual block** is T_W = M_W ∘ A with M_W(z) = f_θ(W z + b) (paper Def. 2.1); a **Pre-LN block**
adds LayerNorms and skip connections: a = h + A(LN₁(h)), u = LN₂(a), out = a + M_W(u) (App. C.1).

Every block exposes ``mlp_input(h) -> (a, u)`` (the residual state before the MLP, or None, and the MLP
input) and ``forward(h, patch=, residual=)``, so :func:`extract_patches` treats one block and a stack alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._errors import ContextPatchError
from ._patches import LowRankPatch, VectorPatch
from .theory import input_patch

__all__ = [
    "SoftmaxAttention", "LinearAttention", "SimpleRNN", "MLP", "ContextualBlock", "PreLNBlock", "PreLNStack",
    "context_outputs", "prefix_outputs", "suffix_outputs", "subcontext_mask", "BlockPatches", "extract_patches",
    "run_blocks", "make_layer",
]

ContextualLayer = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------- layers
class _MultiHead(nn.Module):
    """Shared parts of the attention layers: fused q/k/v projection, output projection W_O, head split."""

    def __init__(self, *, d_model: int, n_heads: int, causal: bool, bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ContextPatchError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v: (..., n, H, d_head) each."""
        *batch, n, d = h.shape
        return self.qkv(h).view(*batch, n, 3, self.n_heads, d // self.n_heads).unbind(-3)

    def _future(self, n: int, device) -> Tensor:
        """(n, n) bool, True above the diagonal: the keys a causal query may not see."""
        return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class SoftmaxAttention(_MultiHead):
    """Multi-head softmax self-attention: (..., n, d_model) -> (..., n, d_model), no positional encoding."""

    def __init__(self, *, d_model: int, n_heads: int = 1, causal: bool = True, bias: bool = False):
        super().__init__(d_model=d_model, n_heads=n_heads, causal=causal, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = (t.transpose(-2, -3) for t in self._heads(h))  # (..., H, n, d_head)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.causal:
            scores = scores.masked_fill(self._future(h.shape[-2], h.device), float("-inf"))
        y = scores.softmax(-1) @ v
        return self.out(y.transpose(-2, -3).reshape(h.shape))


class LinearAttention(_MultiHead):
    """Linear (softmax-free) self-attention, A(C, x) = Σ_h W_O^h Σ_{t ≤ x} v_t^h (k_t^h · q_x^h)."""

    def __init__(self, *, d_model: int, n_heads: int = 1, causal: bool = True):
        super().__init__(d_model=d_model, n_heads=n_heads, causal=causal, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = (t.transpose(-2, -3) for t in self._heads(h))
        scores = q @ k.transpose(-1, -2)
        if self.causal:
            scores = scores.masked_fill(self._future(h.shape[-2], h.device), 0.0)
        y = scores @ v
        return self.out(y.transpose(-2, -3).reshape(h.shape))

    def kv_terms(self, tokens: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened (token, head) terms for :func:`~contextpatch.theory.linear_attention_patch`:

        values (..., n·H, d_model) = W_O^h v_t^h, keys (..., n·H, H·d_head) = k_t^h placed in head block h,
        q (..., H·d_head) = concat_h q^h, so that Σ values · (keys · q) = Σ_t Σ_h W_O^h v_t^h (k_t^h · q^h).
        """
        _, k, v = self._heads(tokens)
        q, _, _ = self._heads(query.unsqueeze(-2))
        *batch, n, H, dh = k.shape
        W_O = self.out.weight.view(-1, H, dh)                                   # (d_model, H, d_head)
        values = torch.einsum("...nhe,dhe->...nhd", v, W_O).reshape(*batch, n * H, -1)
        eye = torch.eye(H, dtype=k.dtype, device=k.device)
        keys = torch.einsum("...nhe,hg->...nhge", k, eye).reshape(*batch, n * H, H * dh)
        return values, keys, q.reshape(*batch, H * dh)


class SimpleRNN(nn.Module):
    """Elman RNN as a contextual layer: s_t = tanh(W_s s_{t−1} + W_x x_t + b), output y_t = W_y s_t."""

    def __init__(self, *, d_model: int, d_state: int | None = None):
        super().__init__()
        d_state = d_state or d_model
        self.W_x = nn.Linear(d_model, d_state)
        self.W_s = nn.Linear(d_state, d_state, bias=False)
        self.W_y = nn.Linear(d_state, d_model, bias=False)
        self.d_state = d_state

    def forward(self, h: Tensor) -> Tensor:
        s = h.new_zeros(h.shape[:-2] + (self.d_state,))
        xs = self.W_x(h)
        outs = []
        for t in range(h.shape[-2]):
            s = torch.tanh(self.W_s(s) + xs[..., t, :])
            outs.append(s)
        return self.W_y(torch.stack(outs, -2))


def make_layer(kind: str, *, d_model: int, n_heads: int = 1, causal: bool = True) -> nn.Module:
    """Build a contextual layer by name: ``softmax``, ``linear`` or ``rnn``."""
    if kind == "softmax":
        return SoftmaxAttention(d_model=d_model, n_heads=n_heads, causal=causal)
    if kind == "linear":
        return LinearAttention(d_model=d_model, n_heads=n_heads, causal=causal)
    if kind == "rnn":
        return SimpleRNN(d_model=d_model)
    raise ContextPatchError(f"unknown contextual layer {kind!r}; choose one of: softmax, linear, rnn")


# ------------------------------------------------------------------------------------ MLP, blocks
class MLP(nn.Module):
    """M_W(z) = f_θ(W z + b): ``fc`` holds (W, b); f_θ = act → [hidden → act]* → ``proj``."""

    def __init__(self, *, d_in: int, d_hidden: int, d_out: int | None = None, depth: int = 1,
                 act: Callable[[Tensor], Tensor] = nn.functional.gelu):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.hidden = nn.ModuleList(nn.Linear(d_hidden, d_hidden) for _ in range(depth - 1))
        self.proj = nn.Linear(d_hidden, d_out or d_in)
        self.act = act

    @property
    def W(self) -> Tensor:
        """The first weight matrix W: (d_hidden, d_in), the one the token patch changes."""
        return self.fc.weight

    def features(self, z: Tensor, *, patch: LowRankPatch | None = None) -> Tensor:
        """g: the input of the output layer ``proj`` (the last hidden activation), with ΔW applied to W."""
        pre = self.fc(z)
        if patch is not None:
            pre = pre + patch.apply(z)  # (W + ΔW) z + b, with ΔW applied factored
        g = self.act(pre)
        for layer in self.hidden:
            g = self.act(layer(g))
        return g

    def forward(self, z: Tensor, *, patch: LowRankPatch | None = None) -> Tensor:
        return self.proj(self.features(z, patch=patch))


class ContextualBlock(nn.Module):
    """T_W(C, x) = M_W(A(C, x)): a contextual layer followed by an MLP; no norm, no skip (paper Def. 2.1)."""

    def __init__(self, *, layer: nn.Module, mlp: MLP):
        super().__init__()
        self.layer, self.mlp = layer, mlp

    def mlp_input(self, h: Tensor) -> tuple[Tensor | None, Tensor]:
        return None, self.layer(h)

    def forward(self, h: Tensor, *, patch: LowRankPatch | None = None, residual: VectorPatch | None = None) -> Tensor:
        out = self.mlp(self.layer(h), patch=patch)
        return out if residual is None else residual.apply(out)


class PreLNBlock(nn.Module):
    """a = h + A(LN₁(h)), u = LN₂(a), out = a + M_W(u); ``layer_norm=False`` gives the plain residual block."""

    def __init__(self, *, layer: nn.Module, mlp: MLP, d_model: int, layer_norm: bool = True):
        super().__init__()
        self.layer, self.mlp = layer, mlp
        self.ln1 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.ln2 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()

    def mlp_input(self, h: Tensor) -> tuple[Tensor, Tensor]:
        a = h + self.layer(self.ln1(h))
        return a, self.ln2(a)

    def forward(self, h: Tensor, *, patch: LowRankPatch | None = None, residual: VectorPatch | None = None) -> Tensor:
        a, u = self.mlp_input(h)
        if residual is not None:
            a = residual.apply(a)  # Δb′ on the skip path
        return a + self.mlp(u, patch=patch)


class PreLNStack(nn.Module):
    """L Pre-LN blocks with skip connections (paper App. C.1 / Thm C.2)."""

    def __init__(self, *, n_layers: int, d_model: int, n_heads: int = 1, d_hidden: int | None = None,
                 layer: str = "softmax", causal: bool = True, layer_norm: bool = True, mlp_depth: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(
            PreLNBlock(layer=make_layer(layer, d_model=d_model, n_heads=n_heads, causal=causal),
                       mlp=MLP(d_in=d_model, d_hidden=d_hidden or 4 * d_model, depth=mlp_depth),
                       d_model=d_model, layer_norm=layer_norm)
            for _ in range(n_layers))

    def forward(self, h: Tensor, patches: Sequence[BlockPatches] | None = None) -> Tensor:
        return run_blocks(self.blocks, h, patches)


# ------------------------------------------------------------------------------ context handling
def subcontext_mask(n_context: int, remove: Sequence[int] | Tensor | None) -> Tensor:
    """Boolean keep-mask over [C, x] (length n_context + 1) that drops the sub-context Y = ``remove``.

    ``remove`` holds indices into C (0..n_context−1) or a boolean mask of length n_context; None removes all
    of C. The query (last position) is always kept.
    """
    if n_context < 1:
        raise ContextPatchError("the context is empty: there is nothing to turn into a patch")
    keep = torch.ones(n_context + 1, dtype=torch.bool)
    if remove is None:
        keep[:-1] = False
        return keep
    r = torch.as_tensor(remove)
    if r.dtype == torch.bool:
        if r.shape != (n_context,):
            raise ContextPatchError(f"a boolean sub-context mask must have length {n_context}, got {tuple(r.shape)}")
        keep[:-1] = ~r
        return keep
    r = r.flatten().long()
    if r.numel() == 0:
        raise ContextPatchError("the sub-context Y is empty: remove at least one context token")
    bad = (r < 0) | (r >= n_context)
    if bool(bad.any()):
        raise ContextPatchError(f"Y is not a subset of C: indices {r[bad].tolist()} are outside 0..{n_context - 1}")
    if r.unique().numel() != r.numel():
        raise ContextPatchError(f"Y lists a context token twice: {r.tolist()}")
    keep[r] = False
    return keep


def context_outputs(layer: ContextualLayer, context: Tensor, query: Tensor,
                    remove: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A(C, x) and A(C∖Y, x) for any contextual layer.

    Args:
        layer: maps (..., n, d_in) -> (..., n, d).
        context: (..., n, d_in) tokens c_1..c_n; query: (..., d_in).
        remove: Y as indices into C or a boolean mask (default: all of C, so the second output is A(x)).
    Returns:
        (A(C, x), A(C∖Y, x)), each (..., d).
    """
    _check_context(context, query)
    keep = subcontext_mask(context.shape[-2], remove)
    seq = torch.cat([context, query.unsqueeze(-2)], -2)
    return layer(seq)[..., -1, :], layer(seq[..., keep.to(seq.device), :])[..., -1, :]


def prefix_outputs(layer: ContextualLayer, context: Tensor, query: Tensor) -> Tensor:
    """Rows A(c_1..c_i, x) for i = 0..n (row 0 = A(x)): (..., n+1, d). Input of scheme (a) dynamics.

    Runs n+1 sequences; for a causal layer all prefixes could share one pass over the context (see the
    engine's batched prefix dynamics for HF models).
    """
    _check_context(context, query)
    rows = [layer(torch.cat([context[..., :i, :], query.unsqueeze(-2)], -2))[..., -1, :]
            for i in range(context.shape[-2] + 1)]
    return torch.stack(rows, -2)


def suffix_outputs(layer: ContextualLayer, context: Tensor, query: Tensor) -> Tensor:
    """Rows a_i = A(c_{i+1}..c_n, x) for i = 0..n (row 0 = A(C, x), row n = A(x)). Input of scheme (b)."""
    _check_context(context, query)
    rows = [layer(torch.cat([context[..., i:, :], query.unsqueeze(-2)], -2))[..., -1, :]
            for i in range(context.shape[-2] + 1)]
    return torch.stack(rows, -2)


def _check_context(context: Tensor, query: Tensor) -> None:
    if context.dim() < 2:
        raise ContextPatchError(f"context must be (..., n, d), got shape {tuple(context.shape)}")
    if context.shape[-2] == 0:
        raise ContextPatchError("the context is empty: there is nothing to turn into a patch")
    if query.shape[-1] != context.shape[-1] or query.shape[:-1] != context.shape[:-2]:
        raise ContextPatchError(f"query {tuple(query.shape)} does not match context {tuple(context.shape)}")


@dataclass(frozen=True)
class BlockPatches:
    """The patches of one block at every kept position: ΔW (batch (..., m)) and Δb′ ((..., m, d), or None)."""

    weight: LowRankPatch
    residual: VectorPatch | None


def extract_patches(blocks: Sequence[nn.Module], tokens: Tensor, keep: Tensor, *,
                    tol: float | None = None) -> list[BlockPatches]:
    """Per-block patches for every kept position, computed block by block (paper Thm C.2, all positions).

    For block l, with-context states come from the full sequence ``tokens`` and context-free states from the
    kept sequence run through the already-patched blocks 1..l−1 (so its block input equals the with-context
    one at kept positions). Then at every kept position

        ΔW = W (u_C − u) uᵀ/‖u‖²,   Δb′ = a_C − a

    and the patched run on ``tokens[..., keep, :]`` reproduces the with-context outputs at kept positions.
    For a block without skip (``ContextualBlock``) u = A(·) and Δb′ is None: ΔW is Thm 2.2's token patch.

    Args:
        blocks: one block or a stack, each with ``mlp_input`` and ``forward(h, patch=, residual=)``.
        tokens: (..., n, d); keep: boolean (n,), True for the positions of C∖Y and the query(ies).
    """
    keep = torch.as_tensor(keep, dtype=torch.bool, device=tokens.device)
    if keep.shape != tokens.shape[-2:-1]:
        raise ContextPatchError(f"keep mask has shape {tuple(keep.shape)}, expected ({tokens.shape[-2]},)")
    if bool(keep.all()):
        raise ContextPatchError("nothing is removed: the keep mask keeps every token, so there is no context to patch")
    if not bool(keep.any()):
        raise ContextPatchError("the keep mask removes every token, including the query")
    h_ctx, h = tokens, tokens[..., keep, :]
    out: list[BlockPatches] = []
    for block in blocks:
        a_c, u_c = block.mlp_input(h_ctx)
        a, u = block.mlp_input(h)
        p = BlockPatches(input_patch(block.mlp.W, u_c[..., keep, :], u, tol=tol),
                         None if a is None else VectorPatch(a_c[..., keep, :] - a))
        out.append(p)
        h_ctx = block(h_ctx)
        h = block(h, patch=p.weight, residual=p.residual)
    return out


def run_blocks(blocks: Sequence[nn.Module], h: Tensor, patches: Sequence[BlockPatches] | None = None) -> Tensor:
    """Run blocks in sequence, applying each block's patches (None: the unpatched model)."""
    if patches is not None and len(patches) != len(blocks):
        raise ContextPatchError(f"got patches for {len(patches)} blocks, the model has {len(blocks)}")
    for i, block in enumerate(blocks):
        h = block(h) if patches is None else block(h, patch=patches[i].weight, residual=patches[i].residual)
    return h
