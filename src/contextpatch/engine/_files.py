"""The on-disk format shared by :class:`ContextPatches` and :class:`StaticPatches`, and the same-model check.

A patch directory holds ``<name>.safetensors`` (every tensor, bit-exact; per-layer factors are named
``layer.<i>.<key>``) and ``<name>.json`` (format, version, the tensor names, the SHA-256 of the tensor file
and the object's metadata). Both files are written atomically; loading checks everything and raises
:class:`PatchFileError` on a missing, truncated, corrupted or inconsistent file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._errors import PatchFileError
from .._io import atomic_write_text, atomic_write_with

__all__ = ["sha256", "save_patch_dir", "load_patch_dir", "check_same_model"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_patch_dir(directory: str | os.PathLike, name: str, fmt: str, version: int, layers: list[dict[str, Tensor]],
                   meta: dict[str, Any], extra: dict[str, Tensor] | None = None) -> Path:
    """Write ``name.safetensors`` (layers + extra tensors) and ``name.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{i}.{k}": v.detach().to("cpu").contiguous() for i, P in enumerate(layers) for k, v in P.items()}
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    tfile = d / f"{name}.safetensors"
    atomic_write_with(tfile, lambda tmp: save_file(tensors, tmp, metadata={"format": fmt}))
    header = {"format": fmt, "format_version": version, "tensor_file": tfile.name, "tensor_sha256": sha256(tfile),
              "tensors": sorted(tensors), "num_layers": len(layers), "meta": meta}
    atomic_write_text(d / f"{name}.json", json.dumps(header, indent=1, sort_keys=True))
    return d


def load_patch_dir(directory: str | os.PathLike, name: str, fmt: str, version: int, *, what: str,
                   device=None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor], dict[str, Any]]:
    """Read a directory written by :func:`save_patch_dir`: (layers, extra tensors, metadata)."""
    d = Path(directory)
    mpath, tpath = d / f"{name}.json", d / f"{name}.safetensors"
    for p in (mpath, tpath):
        if not p.is_file():
            raise PatchFileError(f"missing {what} file {p}")
    try:
        header = json.loads(mpath.read_text())
        names, n_layers, meta = header["tensors"], int(header["num_layers"]), header["meta"]
        got_fmt, got_version, digest = header["format"], header["format_version"], header["tensor_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise PatchFileError(f"{mpath} is not a valid {what} metadata file ({e})") from None
    if got_fmt != fmt or got_version != version:
        raise PatchFileError(f"{mpath}: format {got_fmt!r} v{got_version}, expected {fmt!r} v{version}")
    if sha256(tpath) != digest:
        raise PatchFileError(f"{tpath} is truncated or corrupted: its SHA-256 does not match {mpath.name}")
    try:
        tensors = load_file(str(tpath), device=str(device) if device is not None else "cpu")
    except Exception as e:  # safetensors raises several types for bad headers
        raise PatchFileError(f"{tpath} could not be read as safetensors ({e})") from None
    if sorted(tensors) != sorted(names):
        raise PatchFileError(f"{tpath} holds tensors {sorted(tensors)[:5]}..., expected {names[:5]}...")
    layers: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]
    extra: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("layer."):
            _, i, key = k.split(".", 2)
            layers[int(i)][key] = v
        else:
            extra[k] = v
    return layers, extra, meta


def check_same_model(meta: dict[str, Any], model: nn.Module, num_layers: int, what: str) -> None:
    """Raise :class:`PatchFileError` unless ``model`` has the config hash, weight fingerprint and layer count
    recorded in ``meta`` (``what`` names the object in the message, e.g. "these patches")."""
    from ..adapters import get_adapter
    from ._container import config_hash, weight_fingerprint

    want, got = meta.get("config_hash"), config_hash(model)
    if want != got:
        raise PatchFileError(f"{what} belong to a different model: config hash {want} "
                             f"(model {meta.get('model_name')!r}) != {got} ({type(model).__name__})")
    want_w, got_w = meta.get("weight_fingerprint"), weight_fingerprint(model)
    if want_w != got_w:
        raise PatchFileError(f"{what} belong to a different model: same config but different weights "
                             f"(fingerprint {want_w} != {got_w})")
    if len(get_adapter(model).resolve(model)) != num_layers:
        raise PatchFileError(f"{what} cover {num_layers} layers, the model has a different count")
