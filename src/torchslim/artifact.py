"""The torchslim artifact: ``manifest.json`` + ``tensors.safetensors`` in one directory.

``manifest.json`` holds:

- ``format_version``: refused if newer than this torchslim understands;
- ``source``: how to rebuild the bare architecture (``zoo:``/``torchvision:``/``hf:``/``py:``);
- ``modules``: module swaps to replay on it (quantized layers, reshaped layers), in order;
- ``tensors``: per state_dict entry its encoding, shape, dtype and parts in the safetensors file;
- ``files``: sha256 and size of every data file, checked before anything is read.

Nothing is unpickled: the architecture comes from registered builders, tensors from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .encodings import decode_tensor, encode_tensor
from .errors import ArtifactError
from .modules import OVERRIDES_ATTR, SOURCE_ATTR, build_from_record, get_submodule

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> int:
    """Save ``model`` as an artifact directory, atomically; returns its size in bytes.

    The directory is written under a temporary sibling name and renamed into place, so a crash
    never leaves a half-written artifact at ``path``.

    Examples
    --------
    >>> import tempfile, torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> d = tempfile.mkdtemp()
    >>> n = torchslim.save(m, d + "/model")
    >>> torchslim.load(d + "/model")[1].out_features
    300
    """
    from safetensors.torch import save_file

    source = getattr(model, SOURCE_ATTR, None)
    if not source:
        raise ArtifactError("this model was not built by torchslim (no source record): build it with "
                            "torchslim.build_model(spec) so the artifact can rebuild its architecture")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        parts: dict[str, torch.Tensor] = {}
        tensors: dict[str, Any] = {}
        for name, t in model.state_dict().items():
            enc, enc_parts, meta = encode_tensor(t)
            keys = {}
            for part, value in enc_parts.items():
                key = f"{name}::{part}"
                parts[key] = value.contiguous()
                keys[part] = key
            tensors[name] = {"encoding": enc, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                             "parts": keys, "meta": meta}
        save_file(parts, str(tmp / TENSORS))
        manifest = {
            "format": "torchslim-artifact",
            "format_version": FORMAT_VERSION,
            "torchslim_version": __version__,
            "source": source,
            "modules": getattr(model, OVERRIDES_ATTR, {}),
            "tensors": tensors,
            "files": {TENSORS: {"sha256": _sha256(tmp / TENSORS), "bytes": (tmp / TENSORS).stat().st_size}},
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return artifact_size(path)


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of all files of an artifact directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a torchslim artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mf}: corrupt manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "torchslim-artifact":
        raise ArtifactError(f"{mf}: not a torchslim artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mf}: artifact format version {version!r} is newer than this torchslim "
                            f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade torchslim")
    return manifest


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved at ``path``, checking checksums, keys and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .specs.models import rebuild_from_source

    path = Path(path)
    manifest = read_manifest(path)
    for fname, info in manifest.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise ArtifactError(f"{path}: data file {fname} is missing")
        if f.stat().st_size != info.get("bytes") or _sha256(f) != info.get("sha256"):
            raise ArtifactError(f"{f}: checksum mismatch: the file is truncated or was modified")
    try:
        parts = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path / TENSORS}: unreadable: {exc}") from None

    model = rebuild_from_source(manifest["source"])
    for name, record in manifest.get("modules", {}).items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = get_submodule(model, parent_name)
        except AttributeError:
            raise ArtifactError(f"{path}: module {name!r} named in the manifest is not in the model") from None
        setattr(parent, child, build_from_record(record))
    object.__setattr__(model, OVERRIDES_ATTR, dict(manifest.get("modules", {})))

    state = {}
    for name, info in manifest["tensors"].items():
        try:
            dtype = getattr(torch, info["dtype"])
            enc_parts = {p: parts[k] for p, k in info["parts"].items()}
            state[name] = decode_tensor(info["encoding"], enc_parts, info.get("meta", {}),
                                        tuple(info["shape"]), dtype)
        except (KeyError, ValueError, RuntimeError, AttributeError) as exc:
            raise ArtifactError(f"{path}: tensor {name!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
    from .weights import check_state_dict
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
