"""Step 1 — the with-context targets: the vectors each layer's patch must reproduce, at query positions only.

For block ℓ and kept token t the targets are

    z_C[ℓ]: (B, T_q, d_z)   the MLP input with context
    r_C[ℓ]: (B, T_q, d)     the residual stream just before the MLP output is added, with context

(see :mod:`contextpatch.adapters._base` for where each family reads r). Hooks gather the kept positions
inside the forward pass, so no full activation cache is ever held. Any other producer of these two lists
(the packed shared-context passes of ``_shared_context.py``, the generation cache) can feed
:func:`~contextpatch.engine.patched_pass`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..adapters import FamilyAdapter, get_adapter
from ._model import (
    compute_dtype,
    first_arg,
    logits_to_keep_kw,
    model_output,
    output_name,
    require_hf_model,
    run_model,
    tap_residual,
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
    require_hf_model(model)
    adapter = adapter or get_adapter(model)
    blocks = adapter.resolve(model)
    cd = compute_dtype(next(model.parameters()).dtype)
    L = len(blocks)
    zs: list[Tensor | None] = [None] * L
    rs: list[Tensor | None] = [None] * L

    def gather(x: Tensor) -> Tensor:
        idx = index.to(x.device)
        return x.gather(1, idx.unsqueeze(-1).expand(idx.shape + x.shape[-1:])).to(cd)

    def keep(store: list, i: int):
        def put(x: Tensor) -> None:
            store[i] = x
        return put

    handles = []
    for b in blocks:
        handles.append(b.mlp.register_forward_pre_hook(
            lambda mod, args, kwargs, i=b.index: zs.__setitem__(i, gather(first_arg(args, kwargs))),
            with_kwargs=True))
        handles += tap_residual(b, keep(rs, b.index), gather)
    try:
        out = run_model(model, adapter, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache,
                        logits_to_keep=index if need_output else 1, **model_kwargs)
    finally:
        for h in handles:
            h.remove()
    result = None
    if need_output:
        result = model_output(out)
        kept = logits_to_keep_kw(model, adapter.causal, index)
        result = result.to(cd) if kept and output_name(out) == "logits" else gather(result)
    return CaptureResult(Targets(list(zs), list(rs)), result, getattr(out, "past_key_values", None))
