"""The attention-output slot of a static adapter: where a context's effect δA on the residual stream enters.

In a sequential pre-norm block the residual after attention is r = h + W_o a (a: the concatenated head outputs,
the input of the attention output projection W_o). With the context, the query tokens also attend to the context
tokens, so r_C − r = δA is produced at W_o's output before any MLP sees it. Per head, with λ the share of a query
token's attention that stays on the query and v̄_C the context's mean value,

    a_C = λ · a + (1 − λ) · v̄_C            ⇒   δA = W_o (a_C − a) = −(1 − λ) W_o a + (1 − λ) W_o v̄_C

whose first term is LINEAR in a (a per-head rescaling): a static patch ΔW_o a can carry it, while an MLP-only
adapter must re-express it through the MLP's keys z and hidden units g. The fit (``fit_static(...,
attention=True)``) is the same ridge least squares as the MLP matrices, per block ℓ, before the MLP's own fit:

    ΔW_o = argmin Σ_t ‖ΔW_o a_t − (r_C,t − r_t)‖² + λ‖ΔW_o‖²_F      (a, r read in the context-free pass)

Families: the sequential blocks whose attention output is added to the residual stream unchanged (GPT-2 and the
Llama-like families); others raise :class:`ContextPatchError`.
"""

from __future__ import annotations

from torch import nn

from .._errors import ContextPatchError
from ..adapters import get_adapter

__all__ = ["ATTENTION_OUTPUT", "attention_path", "attention_modules"]

#: family -> path (relative to a block) of the attention output projection whose output is added to r unchanged
ATTENTION_OUTPUT = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "mistral": "self_attn.o_proj",
                    "qwen2": "self_attn.o_proj", "qwen3": "self_attn.o_proj", "gemma": "self_attn.o_proj"}


def attention_path(model: nn.Module) -> str:
    """The attention output projection's path inside a block; :class:`ContextPatchError` for other families."""
    name = get_adapter(model).name
    if name not in ATTENTION_OUTPUT:
        raise ContextPatchError(f"the attention-output slot (attention=True) supports {sorted(ATTENTION_OUTPUT)}, "
                                f"not {name!r} (its attention output is normed or parallel to the MLP)")
    return ATTENTION_OUTPUT[name]


def attention_modules(model: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The attention output projection of every block."""
    path = path or attention_path(model)
    return [b.block.get_submodule(path) for b in get_adapter(model).resolve(model)]
