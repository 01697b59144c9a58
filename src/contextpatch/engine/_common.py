"""Small helpers shared by the capture and patched passes."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError

__all__ = ["compute_dtype", "first_arg", "first_out", "model_output", "forward_kwargs", "check_model", "explicit_mask"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Patch factors and differences are computed in at least float32 (float64 for float64 models)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> Tensor:
    """The hidden-state input of a module call, passed positionally or by keyword."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    raise ContextPatchError(f"could not find the {name!r} input of a hooked module call")


def first_out(out) -> Tensor:
    """Decoder sub-modules return a tensor or a tuple whose first element is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out


def model_output(out) -> Tensor:
    """Logits for LM heads, else the final hidden states (encoders)."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def forward_kwargs(model: nn.Module, *, causal: bool, use_cache: bool, past_key_values=None) -> dict:
    kw: dict = {}
    if causal:
        kw["use_cache"] = use_cache
        if past_key_values is not None:
            kw["past_key_values"] = past_key_values
    return kw


def accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ContextPatchError(f"expected a HuggingFace PreTrainedModel, got {type(model).__name__}")
    if model.training:
        raise ContextPatchError("the model is in training mode (dropout would break exactness): call model.eval()")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ContextPatchError("the model has offloaded (meta-device) weights; patches need every layer's "
                                "weights on a real device (use a device_map without disk/cpu offload)")


def explicit_mask(input_ids: Tensor, attention_mask, position_ids, past_key_values):
    """An all-ones (B, T) mask where HF would otherwise guess one from ``position_ids``.

    With no mask and no cache, HF reads a jump in ``position_ids`` as the start of a new packed sequence and
    blocks attention across it (``masking_utils.find_packed_sequence_indices``). Kept tokens with a gap in
    their positions (a context span in the middle) must still attend to each other, so pass a mask.
    """
    if attention_mask is None and position_ids is not None and past_key_values is None and position_ids.shape[-1] > 1:
        if bool((position_ids.diff(dim=-1) != 1).any()):
            return torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    return attention_mask
