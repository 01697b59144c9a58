"""Step 1 — the with-context targets: the vectors each layer's patch must reproduce, at query positions only.

For block ℓ and kept token t the targets are

    z_C[ℓ]: (B, T_q, d_z)   the MLP input with context
    r_C[ℓ]: (B, T_q, d)     the residual stream just before the MLP output is added, with context

(see :mod:`contextpatch.adapters._base` for where each family reads r). Hooks gather the kept positions
inside the forward pass, so no full activation cache is ever held. Any other producer of these two lists
(e.g. a KV-cache reuse or prefix-masked batch, issue 5) can feed :func:`~contextpatch.engine.patched_pass`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters import FamilyAdapter, get_adapter
from ._common import (
    accepts,
    check_model,
    compute_dtype,
    explicit_mask,
    first_arg,
    first_out,
    forward_kwargs,
    model_output,
)

__all__ = ["Targets", "CaptureResult", "capture_targets"]


@dataclass
class Targets:
    """With-context vectors per layer at the kept positions: ``z[ℓ]``: (B, T_q, d_z), ``r[ℓ]``: (B, T_q, d).

    Stored in the compute dtype (float64 for float64 models, else float32), each on its layer's device.
    """

    z: list[Tensor]
    r: list[Tensor]

    def __len__(self) -> int:
        return len(self.z)

    def to(self, *args, **kwargs) -> Targets:
        return Targets([t.to(*args, **kwargs) for t in self.z], [t.to(*args, **kwargs) for t in self.r])


@dataclass
class CaptureResult:
    targets: Targets
    output: Tensor | None          # (B, T_q, V) logits or (B, T_q, d) final hidden states at the kept positions
    past_key_values: object = None


def capture_targets(model: nn.Module, input_ids: Tensor, index: Tensor, *, adapter: FamilyAdapter | None = None,
                    attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                    past_key_values=None, use_cache: bool = False, need_output: bool = True,
                    **model_kwargs) -> CaptureResult:
    """Run the model WITH the context once and keep z_C, r_C (and the output) at ``index`` only.

    Args:
        input_ids: (B, T) the full sequence (or, with ``past_key_values``, the new tokens).
        index: (B, T_q) long, positions within ``input_ids`` to keep.
    """
    check_model(model)
    adapter = adapter or get_adapter(model)
    blocks = adapter.resolve(model)
    cd = compute_dtype(next(model.parameters()).dtype)
    L = len(blocks)
    zs: list[Tensor | None] = [None] * L
    hs: list[Tensor | None] = [None] * L
    rs: list[Tensor | None] = [None] * L

    def gather(x: Tensor) -> Tensor:
        idx = index.to(x.device)
        return x.gather(1, idx.unsqueeze(-1).expand(idx.shape + x.shape[-1:])).to(cd)

    handles = []

    def pre(i: int, store: list) -> Callable:
        def hook(mod, args, kwargs):
            store[i] = gather(first_arg(args, kwargs))
        return hook

    for b in blocks:
        handles.append(b.mlp.register_forward_pre_hook(pre(b.index, zs), with_kwargs=True))
        if b.residual_kind == "norm":
            handles.append(b.residual_module.register_forward_pre_hook(pre(b.index, rs), with_kwargs=True))
        elif b.residual_kind == "parallel":
            handles.append(b.block.register_forward_pre_hook(pre(b.index, hs), with_kwargs=True))

            def attn_hook(mod, args, out, i=b.index):
                rs[i] = hs[i] + gather(first_out(out))
            handles.append(b.residual_module.register_forward_hook(attn_hook))
    kw = forward_kwargs(model, causal=adapter.causal, use_cache=use_cache, past_key_values=past_key_values)
    if adapter.causal and accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = index if need_output else 1
    try:
        with torch.no_grad():
            mask = explicit_mask(input_ids, attention_mask, position_ids, past_key_values)
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        **kw, **model_kwargs)
    finally:
        for h in handles:
            h.remove()
    if adapter.residual == "mlp":
        rs = list(zs)
    result = None
    if need_output:
        result = model_output(out)
        result = result.to(cd) if "logits_to_keep" in kw else gather(result)
    return CaptureResult(Targets(list(zs), list(rs)), result, getattr(out, "past_key_values", None))
