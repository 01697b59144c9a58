"""What every engine step needs from a HF model: input checks, forward calls, and the residual-stream tap.

    require_hf_model(model)        an eval-mode HF model with real weights (else one clear error)
    check_inputs(model, ids, …)    token ids inside the vocabulary, position ids of the right shape and range
    run_model(model, adapter, …)   one forward pass (no cache unless asked), explicit mask on position jumps
    tap_residual(block, on_r, …)   hooks reporting r, the residual stream just before the MLP output is added
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import ContextPatchError

__all__ = ["compute_dtype", "first_arg", "first_out", "model_output", "output_name", "require_hf_model",
           "check_inputs", "check_positions", "explicit_mask", "run_model", "tap_residual", "rms_unit", "norm_eps",
           "linear_weight",
           "logits_to_keep_kw"]


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
    """Logits for LM heads, else the final hidden states (bare models and encoders)."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def output_name(out) -> str:
    """"logits" or "last_hidden_state": what :func:`model_output` returned."""
    return "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_to_keep_kw(model: nn.Module, causal: bool, keep) -> dict:
    """``{"logits_to_keep": keep}`` where the model takes it (causal LMs), else ``{}``."""
    return {"logits_to_keep": keep} if causal and _accepts(model, "logits_to_keep") else {}


def require_hf_model(model: nn.Module) -> None:
    """An eval-mode HuggingFace model whose weights are all on real devices."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ContextPatchError(f"expected a HuggingFace PreTrainedModel, got {type(model).__name__}")
    if model.training:
        raise ContextPatchError("the model is in training mode (dropout would break exactness): call model.eval()")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ContextPatchError("the model has offloaded (meta-device) weights; patches need every layer's "
                                "weights on a real device (use a device_map without disk/cpu offload)")
    head = type(model).__name__
    if head.endswith(("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                      "ForMultipleChoice")):
        raise ContextPatchError(f"{head}: task heads other than language modelling are not supported; patch its "
                                "base model instead (e.g. model.base_model) or load the *ForCausalLM / AutoModel "
                                "class of the same checkpoint")


def check_inputs(model: nn.Module, input_ids: Tensor, position_ids: Tensor | None = None) -> None:
    """Token ids in [0, vocab), position ids (B, T) or (1, T) within the model's positions, one clear error each."""
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None)
    if input_ids.numel() and vocab:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ContextPatchError(f"token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                                    f"{lo if lo < 0 else hi}")
    B, T = input_ids.shape[-2:] if input_ids.dim() == 2 else (1, input_ids.shape[-1])
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
            raise ContextPatchError(f"position_ids must have shape ({B}, {T}) or (1, {T}) like input_ids, got "
                                    f"{tuple(position_ids.shape)}")
        if position_ids.numel() and int(position_ids.min()) < 0:
            raise ContextPatchError("position_ids must be ≥ 0")
        top = int(position_ids.max()) + 1 if position_ids.numel() else 0
    else:
        top = T
    check_positions(model, top)


def check_positions(model: nn.Module, top: int) -> None:
    """Positions 0..top−1 must exist in the model (``max_position_embeddings`` / ``n_positions``)."""
    cfg = model.config
    n_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if n_pos and top > n_pos:
        raise ContextPatchError(f"the sequence reaches position {top - 1}, beyond the model's "
                                f"{n_pos} positions (max_position_embeddings)")


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


def run_model(model: nn.Module, adapter, input_ids: Tensor, *, position_ids=None, attention_mask=None,
              past_key_values=None, use_cache: bool = False, logits_to_keep=0, **model_kwargs):
    """One forward pass under ``no_grad`` (the hooks installed by the caller stay active)."""
    kw: dict = {}
    if adapter.causal:
        kw["use_cache"] = use_cache
        if past_key_values is not None:
            kw["past_key_values"] = past_key_values
    kw.update(logits_to_keep_kw(model, adapter.causal, logits_to_keep))
    with torch.no_grad():
        mask = explicit_mask(input_ids, attention_mask, position_ids, past_key_values)
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kw, **model_kwargs)


def tap_residual(block, on_r: Callable[[Tensor], None], prep: Callable[[Tensor], Tensor]) -> list:
    """Hooks that call ``on_r(r)`` with r = the residual stream just before block ``block``'s MLP output is added.

    ``prep`` maps a raw hidden-state tensor to what the caller keeps (e.g. gather the query positions, cast to
    the compute dtype); it is applied before any addition. Residual sources (``adapters/_base.py``):
    "norm": the input of the pre-MLP norm; "parallel": block input + attention output; "mlp": the MLP input.
    Returns the hook handles.
    """
    kind = block.residual_kind
    if kind == "norm":
        return [block.residual_module.register_forward_pre_hook(
            lambda mod, args, kwargs: on_r(prep(first_arg(args, kwargs))), with_kwargs=True)]
    if kind == "mlp":
        return [block.mlp.register_forward_pre_hook(
            lambda mod, args, kwargs: on_r(prep(first_arg(args, kwargs))), with_kwargs=True)]
    if kind == "parallel":
        box: dict[str, Tensor] = {}

        def pre(mod, args, kwargs):
            box["h"] = prep(first_arg(args, kwargs))

        def post(mod, args, out):
            on_r(box.pop("h") + prep(first_out(out)))
        return [block.block.register_forward_pre_hook(pre, with_kwargs=True),
                block.residual_module.register_forward_hook(post)]
    raise ContextPatchError(f"unknown residual source {kind!r}")


def rms_unit(y: Tensor, eps: float) -> Tensor:
    """u = y / sqrt(mean(y²) + eps): the unscaled RMS-normalised vector."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm/LayerNorm module (HF spells it ``eps`` or ``variance_epsilon``)."""
    for name in ("eps", "variance_epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ContextPatchError(f"cannot find the epsilon of {type(norm).__name__}")


def linear_weight(mod: nn.Module, conv1d: bool) -> Tensor:
    """Weight in nn.Linear orientation (d_out, d_in) (GPT-2's Conv1D stores (d_in, d_out))."""
    return mod.weight.T if conv1d else mod.weight
