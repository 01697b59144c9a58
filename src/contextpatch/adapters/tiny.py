"""Tiny random-weight models of every supported family, built offline (tests, CLI ``--random``, benchmarks).

Norm gains and all biases are randomised (HF initialises them to 1/0, which would exercise the norm and
bias code paths only trivially), attention is eager, dropouts are off and the model is in ``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import UnsupportedModelError

__all__ = ["TINY_ARCHS", "tiny_config", "tiny_model", "ADVERSARIAL", "adversarial_contexts"]

_V, _D, _F, _L, _H, _KV, _HD, _P = 100, 32, 64, 3, 4, 2, 8, 64
_TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEC = dict(vocab_size=_V, hidden_size=_D, intermediate_size=_F, num_hidden_layers=_L, num_attention_heads=_H,
            num_key_value_heads=_KV, max_position_embeddings=_P, initializer_range=0.2, **_TOK)


def _configs() -> dict:
    import transformers as tf  # lazy: importing contextpatch stays light

    return {
        "gpt2": tf.GPT2Config(vocab_size=_V, n_embd=_D, n_layer=_L, n_head=_H, n_inner=_F, n_positions=_P,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, **_TOK),
        "llama": tf.LlamaConfig(**_DEC),
        "mistral": tf.MistralConfig(**_DEC, sliding_window=None),
        "qwen2": tf.Qwen2Config(**_DEC),
        "qwen3": tf.Qwen3Config(**_DEC, head_dim=_HD),
        "gemma": tf.GemmaConfig(**_DEC, head_dim=_HD),
        "gemma2": tf.Gemma2Config(**_DEC, head_dim=_HD, query_pre_attn_scalar=_HD, sliding_window=_P),
        "gemma3": tf.Gemma3TextConfig(**_DEC, head_dim=_HD, query_pre_attn_scalar=_HD, sliding_window=_P,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "bert": tf.BertConfig(vocab_size=_V, hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H,
                              intermediate_size=_F, max_position_embeddings=_P, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, initializer_range=0.2, pad_token_id=0),
        "phi": tf.PhiConfig(vocab_size=_V, hidden_size=_D, intermediate_size=_F, num_hidden_layers=_L,
                            num_attention_heads=_H, max_position_embeddings=_P, partial_rotary_factor=0.5,
                            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, initializer_range=0.2, **_TOK),
        "gptj": tf.GPTJConfig(vocab_size=_V, n_embd=_D, n_layer=_L, n_head=_H, n_inner=_F, rotary_dim=4,
                              n_positions=_P, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              initializer_range=0.2, **_TOK),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=_V, hidden_size=_D, intermediate_size=_F, num_hidden_layers=_L,
                                     num_attention_heads=_H, max_position_embeddings=_P, rotary_pct=0.5,
                                     use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
                                     initializer_range=0.2, **_TOK),
        "falcon": tf.FalconConfig(vocab_size=_V, hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H,
                                  max_position_embeddings=_P, parallel_attn=True, new_decoder_architecture=False,
                                  alibi=False, bias=False, hidden_dropout=0.0, attention_dropout=0.0,
                                  initializer_range=0.2, **_TOK),
        "mixtral": tf.MixtralConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    }


TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "bert",
                                "phi", "gptj", "gpt_neox", "falcon", "mixtral")


def tiny_config(arch: str):
    """The transformers config of the tiny ``arch`` model."""
    if arch not in TINY_ARCHS:
        raise UnsupportedModelError(f"unknown arch {arch!r}; choose one of: {', '.join(TINY_ARCHS)}")
    return _configs()[arch]


def tiny_model(arch: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, device: str | None = None,
               overrides: dict | None = None) -> nn.Module:
    """A tiny random model (hidden 32, 3 layers, vocab 100) with randomised norm gains and biases, eager, eval().

    ``overrides``: config attributes to change (e.g. ``{"use_parallel_residual": False}``).
    """
    import transformers as tf

    config = tiny_config(arch)
    for k, v in (overrides or {}).items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    auto = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    kwargs = {"attn_implementation": "eager"}
    if arch == "mixtral":
        kwargs["experts_implementation"] = "eager"
    model = auto.from_config(config, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower() and isinstance(getattr(mod, "weight", None), nn.Parameter):
                mod.weight.add_(0.3 * torch.randn(mod.weight.shape, generator=g))   # gains 1 ± 0.3 (Gemma: w ± 0.3)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


# Configurations where exactness is hardest to keep (tests and the README parity table use these): sliding
# windows shorter than the context (padding slots fully outside every window), attention and final-logit
# softcapping, layers mixing sliding and global attention, partial rotary, MoE routing.
ADVERSARIAL: dict[str, dict] = {
    "mistral": {"sliding_window": 3},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1,
              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    "qwen3": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1,
              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "gemma3": {"sliding_window": 3, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 30.0,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "mixtral": {"sliding_window": 3},
}


def adversarial_contexts(T: int = 16) -> dict[str, object]:
    """Context specs for a (2, T) batch: a prefix, a middle span, and a scattered per-row mask whose rows keep
    different numbers of tokens (so the context-free pass pads one row far beyond a short window)."""
    scattered = torch.zeros(2, T, dtype=torch.bool)
    scattered[0, [1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13]] = True       # row 0 keeps 5 tokens, scattered
    scattered[1, [3, 8]] = True                                      # row 1 keeps T − 2 tokens
    return {"prefix": T // 2, "middle": slice(2, 9), "scattered": scattered}
