"""Which model a patch belongs to: a config hash and a fingerprint of every weight, and the same-model check.

    config_hash(model)         SHA-256 (16 hex) of the architecture config without volatile keys (dtype, paths)
    weight_fingerprint(model)  SHA-256 (16 hex) over (name, dtype, shape, CRC-32 of the bytes) of EVERY
                               parameter and buffer: any changed element, sign, row or layer changes it

The fingerprint reads all weights once (CRC-32 runs at memory speed and releases the GIL, so tensors are hashed
on a small thread pool). It is never cached: a cache keyed on version counters would miss in-place edits
through ``param.data``. Its cost is measured by ``benchmarks/bench_extraction.py`` (README table).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .._errors import PatchFileError

__all__ = ["config_hash", "weight_fingerprint", "check_same_model"]

_VOLATILE = {"transformers_version", "torch_dtype", "dtype", "architectures", "attn_implementation",
             "experts_implementation", "use_cache", "output_hidden_states", "output_attentions", "return_dict"}


def config_hash(model_or_config) -> str:
    """SHA-256 (first 16 hex) of the architecture config, without volatile keys (dtype, paths, versions)."""
    cfg = getattr(model_or_config, "config", model_or_config).to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _crc(t: torch.Tensor) -> int:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def weight_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex) over every parameter and buffer: name, dtype, shape and the CRC-32 of its bytes.

    Tied weights (one storage under two names) are read once and recorded under both names. Independent of the
    device.
    """
    named = [(n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t) for n, t in model.named_buffers(remove_duplicate=False) if t is not None]
    named.sort(key=lambda nt: nt[0])
    key = {n: (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) for n, t in named}
    unique = {key[n]: t for n, t in named}                  # tied weights (one storage, two names): read once
    with ThreadPoolExecutor(max_workers=4) as pool:
        crcs = dict(zip(unique, pool.map(_crc, unique.values()), strict=True))
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{crcs[key[name]]:08x};".encode())
    return h.hexdigest()[:16]


def check_same_model(config_hash_want: str, fingerprint_want: str, model: nn.Module, *, model_name: str,
                     what: str, weights: bool = True) -> None:
    """Raise :class:`PatchFileError` unless ``model`` has the recorded config hash and (``weights``) weight
    fingerprint."""
    got = config_hash(model)
    if config_hash_want != got:
        raise PatchFileError(f"{what} belong to a different model: config hash {config_hash_want} "
                             f"(model {model_name!r}) != {got} ({type(model).__name__})")
    if not weights:
        return
    got_w = weight_fingerprint(model)
    if fingerprint_want != got_w:
        raise PatchFileError(f"{what} belong to a different model: same config but different weights "
                             f"(fingerprint {fingerprint_want} != {got_w}); every parameter is compared")
