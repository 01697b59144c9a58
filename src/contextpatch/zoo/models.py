"""The two zoo architectures: a Llama (RMSNorm, gated SiLU MLP, RoPE) and a GPT-2 twin (LayerNorm, GELU MLP,
learned positions), both ~2.7–3.4M float32 parameters, ``max positions = 4096``, eager attention.

Sizes (vocabulary V = 108): Llama d=256, 4 layers, 8 heads (head dim 32), MLP 512:
4·(4d² + 3·d·512) + 2·V·d ≈ 2.68M. GPT-2 d=224, 4 layers, 4 heads (head dim 56), MLP 4d:
4·(12d²) + 4096·d + V·d ≈ 3.34M (the 4096 learned positions cost 0.92M).
``width``/``layers`` override the defaults (tiny models in tests, narrower probes).
"""

from __future__ import annotations

import torch

from .tasks import vocabulary
from .tokenizer import BOS, EOS, PAD

__all__ = ["ARCHS", "make_config", "make_model", "count_params", "sinusoid_positions"]

ARCHS = ("llama", "gpt2")
MAX_POSITIONS = 4096


def make_config(arch: str, *, width: int | None = None, layers: int | None = None, heads: int | None = None,
                mlp: int | None = None):
    """The ``transformers`` config of ``arch`` (``llama`` or ``gpt2``)."""
    import transformers as tf

    from .._errors import ContextPatchError

    vocab = len(vocabulary())
    common = dict(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "llama":
        d = width or 256
        h = heads or max(1, d // 32)
        return tf.LlamaConfig(hidden_size=d, intermediate_size=mlp or 2 * d, num_hidden_layers=layers or 4,
                              num_attention_heads=h, num_key_value_heads=h,
                              max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
                              tie_word_embeddings=False, attn_implementation="eager", **common)
    if arch == "gpt2":
        d = width or 224
        return tf.GPT2Config(n_embd=d, n_layer=layers or 4, n_head=heads or max(1, d // 56), n_positions=MAX_POSITIONS,
                             n_inner=mlp,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", **common)
    raise ContextPatchError(f"unknown architecture {arch!r}; architectures: {', '.join(ARCHS)}")


def make_model(arch: str, *, seed: int, width: int | None = None, layers: int | None = None,
               heads: int | None = None, mlp: int | None = None) -> torch.nn.Module:
    """A freshly initialised float32 model (``torch.manual_seed(seed)`` before construction)."""
    import transformers as tf

    cfg = make_config(arch, width=width, layers=layers, heads=heads, mlp=mlp)
    torch.manual_seed(seed)
    cls = tf.LlamaForCausalLM if arch == "llama" else tf.GPT2LMHeadModel
    return cls(cfg).float()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sinusoid_positions(n: int, d: int, *, row_norm: float) -> torch.Tensor:
    """(n, d) sinusoidal position table (Vaswani et al. 2017), each row scaled to norm ``row_norm``:

        P[p, 2i] = sin(p / 10000^(2i/d)),  P[p, 2i+1] = cos(p / 10000^(2i/d))

    P[p + k] is a fixed rotation of P[p] for every p, so attention can find "the previous token" linearly from
    the first step; a GPT-2 whose learned positions start at N(0, 0.02) has no such structure to begin with."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return (table * (row_norm / (d / 2) ** 0.5)).float()

