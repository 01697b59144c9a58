"""Training a zoo model from a trained zoo teacher: attention transfer and next-token distillation.

The GPT-2 twin does not form induction heads from the task loss alone (its learned absolute positions must first
encode "the previous token", docs/zoo.md). A trained zoo Llama already has every mechanism the tasks need, so
the twin can be taught them directly, as MiniLM (Wang et al. 2020, "Deep Self-Attention Distillation") distils a
BERT: the student's attention distributions are pulled towards the teacher's, head by head, and its next-token
distributions towards the teacher's, on every real token of the training batch:

    L = CE_answers + α · mean_{ℓ,h,q} KL(A_T[ℓ,h,q,:] ‖ A_S[ℓ,h,q,:]) + β · mean_t KL(p_T(·|<t) ‖ p_S(·|<t))

over real (non-pad) query rows q and positions t; ℓ, h pair the same layer and head index (same depth and head
count required). The teacher is run in float32 without gradients, eager attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._errors import ContextPatchError
from .data import answer_loss
from .tokenizer import PAD

__all__ = ["load_teacher", "distill_loss"]


def load_teacher(folder: str, student: torch.nn.Module) -> torch.nn.Module:
    """The zoo model in ``folder`` (a folder, or the name of a shipped zoo model; eval, eager attention), checked
    against ``student``'s depth, heads and vocabulary."""
    import transformers as tf

    from .registry import RECIPES, path

    if not (Path(folder) / "zoo.json").is_file():
        if folder in RECIPES:
            folder = str(path(folder))
        else:
            raise ContextPatchError(f"teacher={folder!r} is neither a zoo model folder (no zoo.json) nor a shipped "
                                    f"zoo model ({', '.join(RECIPES)})")
    teacher = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t, s = teacher.config, student.config
    shape_t = (t.num_hidden_layers, t.num_attention_heads, t.vocab_size)
    shape_s = (s.num_hidden_layers, s.num_attention_heads, s.vocab_size)
    if shape_t != shape_s:
        raise ContextPatchError(f"teacher {folder!r} has (layers, heads, vocab) {shape_t}, the student {shape_s}: "
                                "attention transfer pairs layers and heads one to one")
    return teacher


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis of probability tensors (0·log 0 = 0)."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor, *,
                 attn_weight: float, logit_weight: float) -> tuple[torch.Tensor, dict]:
    """The loss of the module docstring on one batch; returns (loss, its parts as floats)."""
    real = ids != PAD                                                   # (B, T); right padding, <bos> = 1
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_attentions=attn_weight > 0)
    s_out = student(input_ids=ids, output_attentions=attn_weight > 0)
    loss = answer_loss(s_out.logits, ids, weights)
    parts = {"ce": float(loss.detach())}
    if logit_weight > 0:
        kl = _kl_rows(t_out.logits.float().softmax(-1), s_out.logits.float().softmax(-1))
        kl = kl[real].mean()
        loss = loss + logit_weight * kl
        parts["logit_kl"] = float(kl.detach())
    if attn_weight > 0:
        kls = [_kl_rows(a_t, a_s).mean(1)[real].mean() for a_t, a_s in zip(t_out.attentions, s_out.attentions,
                                                                               strict=True)]
        akl = torch.stack(kls).mean()
        loss = loss + attn_weight * akl
        parts["attn_kl"] = float(akl.detach())
    return loss, parts
