"""The on-disk format shared by :class:`ContextPatches` and :class:`StaticPatches`.

A patch directory holds two files, both written atomically:

    <name>.safetensors   every tensor (``layer.<ℓ>.<LayerPatch name>`` and the object's own tensors, bit-exact),
                         and in its header the metadata as canonical JSON
    <name>.json          a readable copy: format, version, tensor names, the SHA-256 of the tensor file, metadata

Loading checks the SHA-256 (which covers the embedded metadata), that the JSON metadata equals the embedded one
(an edited ``<name>.json`` fails), validates the metadata as a :class:`PatchMeta` and every layer against its
slot, and raises :class:`PatchFileError` with the reason on any missing, truncated, corrupted or edited file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .._errors import PatchFileError
from .._io import atomic_write_text, atomic_write_with
from ._records import META_VERSION, LayerPatch, PatchMeta, check_layers

__all__ = ["sha256", "save_patch_dir", "load_patch_dir"]

_META_KEY = "contextpatch.meta"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(meta: PatchMeta) -> str:
    return json.dumps(meta.to_dict(), sort_keys=True, separators=(",", ":"))


def save_patch_dir(directory: str | os.PathLike, name: str, fmt: str, layers: list[LayerPatch], meta: PatchMeta,
                   extra: dict[str, Tensor] | None = None) -> Path:
    """Write ``name.safetensors`` (layers + extra tensors + embedded metadata) and ``name.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    items = [(f"layer.{i}.{k}", v) for i, lp in enumerate(layers) for k, v in lp.tensors().items()]
    items += list((extra or {}).items())
    for key, v in items:
        t = v.detach().to("cpu").contiguous()
        if (t.data_ptr(), t.numel()) in seen:          # a factor shared by several patches: store a copy
            t = t.clone()
        seen.add((t.data_ptr(), t.numel()))
        tensors[key] = t
    tfile = d / f"{name}.safetensors"
    atomic_write_with(tfile, lambda tmp: save_file(tensors, tmp, metadata={"format": fmt, _META_KEY: _canonical(meta)}))
    header = {"format": fmt, "format_version": META_VERSION, "tensor_file": tfile.name, "tensor_sha256": sha256(tfile),
              "tensors": sorted(tensors), "meta": meta.to_dict()}
    atomic_write_text(d / f"{name}.json", json.dumps(header, indent=1, sort_keys=True))
    return d


def load_patch_dir(directory: str | os.PathLike, name: str, fmt: str, *, what: str,
                   device=None) -> tuple[list[LayerPatch], dict[str, Tensor], PatchMeta]:
    """Read a directory written by :func:`save_patch_dir`: (layers, extra tensors, metadata)."""
    d = Path(directory)
    mpath, tpath = d / f"{name}.json", d / f"{name}.safetensors"
    if not d.is_dir():
        raise PatchFileError(f"missing {what} folder {d}")
    for p in (mpath, tpath):
        if not p.is_file():
            raise PatchFileError(f"missing {what} file {p}")
    try:
        header = json.loads(mpath.read_text())
        names, meta_json = list(header["tensors"]), header["meta"]
        got_fmt, got_version, digest = header["format"], header["format_version"], str(header["tensor_sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise PatchFileError(f"{mpath} is not a valid {what} metadata file ({type(e).__name__}: {e})") from None
    if got_fmt != fmt or got_version != META_VERSION:
        raise PatchFileError(f"{mpath}: format {got_fmt!r} v{got_version}, expected {fmt!r} v{META_VERSION} "
                             "(files written by another contextpatch version must be re-extracted)")
    if sha256(tpath) != digest:
        raise PatchFileError(f"{tpath} is truncated or corrupted: its SHA-256 does not match {mpath.name}")
    dev = str(device) if device is not None else "cpu"
    try:
        with safe_open(str(tpath), framework="pt", device=dev) as f:
            embedded = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises several types for bad headers
        raise PatchFileError(f"{tpath} could not be read as safetensors ({e})") from None
    where = f"{d}: "
    meta = PatchMeta.from_dict(meta_json, where=where)
    if embedded is None or embedded != _canonical(meta):
        raise PatchFileError(f"{mpath} was edited: its metadata differs from the copy sealed in {tpath.name}")
    if sorted(tensors) != sorted(names):
        raise PatchFileError(f"{tpath} holds tensors {sorted(tensors)[:5]}..., expected {sorted(names)[:5]}...")
    flat: list[dict[str, Tensor]] = [{} for _ in range(meta.num_layers)]
    extra: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("layer."):
            _, i, key = k.split(".", 2)
            if not i.isdigit() or int(i) >= meta.num_layers:
                raise PatchFileError(f"{where}tensor {k!r} is outside the {meta.num_layers} layers of the metadata")
            flat[int(i)][key] = v
        else:
            extra[k] = v
    layers = [LayerPatch.from_tensors(t, where=f"{where}layer {i}: ") for i, t in enumerate(flat)]
    check_layers(layers, meta, where=where)
    return layers, extra, meta
