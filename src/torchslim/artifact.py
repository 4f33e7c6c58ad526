"""The torchslim artifact: ``manifest.json`` + ``tensors.safetensors`` in one directory.

``manifest.json`` holds:

- ``format_version``: refused if newer than this torchslim understands;
- ``source``: how to rebuild the bare architecture (``zoo:``/``torchvision:``/``hf:``/``py:``);
- ``edits``: the ordered edit log replayed on it (module swaps, resized layers, attributes set,
  modules deleted, tensors resized; see :mod:`torchslim.edits`). Versions 1 and 2 held a
  ``modules`` mapping of swaps instead, still read;
- ``tensors``: per state_dict entry its encoding, shape, dtype and parts in the safetensors file;
- ``aliases``: state_dict names that share another entry's tensor (tied weights), stored once:
  ``{"alias": "stored name"}``; absent in artifacts written before aliases existed;
- ``files``: sha256 and size of every data file (``tensors.safetensors`` at least), checked
  before anything is read;
- ``preprocessing``: how raw data becomes the model's inputs, as the task records it
  (``Task.preprocessing``: for images ``{"input": "image", "scale", "mean", "std", "layout",
  "dtype", ...}``, for text the tokenizer and ``max_length``), or null when unknown; absent in
  artifacts written before it existed (read as null; :func:`read_preprocessing`).

Nothing is unpickled: the architecture comes from registered builders, tensors from safetensors.
Loading rebuilds the architecture with its weights on the meta device (nothing allocated) and
assigns the stored tensors, so stored dtypes win (a bf16 model reloads as bf16) and no weight
exists twice.
The manifest's whole structure is checked before any of it is used, and a ``py:`` source (the
user's own Python file, which rebuilding would import) is only rebuilt when the caller trusts it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from . import layers as _layers  # noqa: F401  (registers the core layer classes)
from .edits import edits_of, replay, validate_edits
from . import entropy as _entropy  # noqa: F401  (registers the entropy-coded encodings ans, relative-index-ans)
from .encodings import ENCODINGS, decode_tensor, encode_tensor
from .errors import ArtifactError, UserError
from .modules import SOURCE_ATTR, get_submodule
from .outputs import get_output
from .specs.models import rebuild_from_source, register_model_source, source_record

#: the newest format this code reads: 1 had module swaps (``modules``), 2 added ``aliases`` (tied
#: tensors), 3 the ``edits`` log and packed / filled encodings, 4 the ``relative-index`` and ``nm``
#: sparse encodings, 5 the entropy-coded ``ans`` and ``relative-index-ans``, so an older torchslim
#: says "upgrade" instead of misreading them. An artifact is written with the oldest version that
#: describes it (3 unless a tensor uses an encoding of 4 or 5).
FORMAT_VERSION = 5
#: the version written when no tensor needs a newer one (the ``edits`` log is always written)
BASE_FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
#: the copy of a ``py:`` model's Python file inside the artifact
SOURCE_CODE = "source.py"
#: the largest manifest.json read (a 1000-layer model's is about 1 MiB)
MAX_MANIFEST_BYTES = 32 << 20
#: setting this environment variable to 1 has the effect of ``load(..., trust_code=True)``
TRUST_ENV = "TORCHSLIM_TRUST_CODE"

#: dtypes a manifest may name (the canonical ``torch`` names that safetensors stores)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                 "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
    if isinstance(getattr(torch, name, None), torch.dtype)
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_identity(t: torch.Tensor) -> tuple | None:
    """What makes two state_dict entries the same tensor (tied weights), or None if unknowable.

    ``state_dict()`` detaches each entry into a new tensor object, so ties show as the same
    storage viewed the same way. Empty tensors all sit at address 0 and are never tied.
    """
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None,
         source: str | None = None, args: dict[str, Any] | None = None,
         preprocessing: dict[str, Any] | None = None) -> int:
    """Save ``model`` as an artifact directory, atomically; returns its size in bytes.

    ``preprocessing`` (plain JSON values, e.g. a task's ``preprocessing``) is recorded in the
    manifest for whoever deploys the model.

    The directory is written under a temporary sibling name and renamed into place, so a crash
    never leaves a half-written artifact at ``path``. A ``py:`` model's Python file is copied
    into the artifact (``source.py``, its sha256 in the manifest), and loading rebuilds from
    that copy, so the directory can be moved.

    Parameters
    ----------
    model : nn.Module
        Built by torchslim (:func:`torchslim.build_model`, :func:`torchslim.load`), or any module
        when ``source`` says how its architecture is rebuilt.
    path : path
        The artifact directory (replaced if it exists).
    source : str, optional
        A model spec that rebuilds ``model``'s architecture, such as ``py:FILE.py:FACTORY``
        (called with ``args``) or ``torchvision:resnet18``; it overrides the model's own record.
        The weights come from ``model``.
    args : dict, optional
        Builder keyword arguments for ``source``.

    Raises
    ------
    ArtifactError
        The model has no source record and no ``source`` is given, or its architecture is not
        what the source and edit log rebuild (names and shapes are compared).

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

    if source is not None:
        record = source_record(source, args)
    else:
        record = getattr(model, SOURCE_ATTR, None)
    if not record:
        raise ArtifactError(
            f"cannot save a {type(model).__name__} that torchslim did not build (no source record): pass "
            "source='py:FILE.py:FACTORY' (a function returning this architecture) to torchslim.save, or "
            "build it with torchslim.build_model(spec)")
    source = dict(record)
    if get_output(model) is not None:
        source["output"] = get_output(model)
    _check_rebuilds(model, source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); a model folder is not
    try:
        parts: dict[str, torch.Tensor] = {}
        tensors: dict[str, Any] = {}
        aliases: dict[str, str] = {}
        stored: dict[tuple, str] = {}  # storage identity -> the name it is stored under
        for name, t in model.state_dict().items():
            if _dtype_name(t.dtype) not in DTYPES:
                raise ArtifactError(f"cannot save {name}: dtype {_dtype_name(t.dtype)} is not storable "
                                    f"(accepted: {', '.join(DTYPES)})")
            ident = _storage_identity(t)
            if ident is not None and ident in stored:  # a tied tensor: store it once
                aliases[name] = stored[ident]
                continue
            if ident is not None:
                stored[ident] = name
            enc, enc_parts, meta = encode_tensor(t)
            keys = {}
            for part, value in enc_parts.items():
                key = f"{name}::{part}"
                parts[key] = value.contiguous()
                keys[part] = key
            tensors[name] = {"encoding": enc, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                             "parts": keys, "meta": meta}
        save_file(parts, str(tmp / TENSORS))
        files = [TENSORS]
        if source["spec"].startswith("py:"):  # the code travels with the artifact
            shutil.copyfile(source["file"], tmp / SOURCE_CODE)
            source["code"] = SOURCE_CODE
            files.append(SOURCE_CODE)
        manifest = {
            "format": "torchslim-artifact",
            "format_version": max([BASE_FORMAT_VERSION] + [ENCODINGS[t["encoding"]].since for t in tensors.values()]),
            "torchslim_version": __version__,
            "source": source,
            "edits": edits_of(model),
            "tensors": tensors,
            "aliases": aliases,
            "files": {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
            "extra": extra or {},
            "preprocessing": preprocessing,
        }
        # one line, no indentation: on a small compressed model the manifest is a tenth of the bytes
        (tmp / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":"), sort_keys=False))
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


def _check_rebuilds(model: nn.Module, source: dict[str, Any]) -> None:
    """Refuse to save a model whose architecture its source record and edit log do not rebuild
    (a module assigned by hand instead of through :mod:`torchslim.edits`): such an artifact
    could never be loaded. The rebuild is on the meta device: names and shapes only."""
    try:
        rebuilt = _rebuild(Path("the model"), source, edits_of(model), mode="meta")
    except ArtifactError as exc:
        raise ArtifactError(f"cannot save: {exc}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    diffs = [f"{k} is {want[k]} here but {got[k]} rebuilt" for k in want if k in got and want[k] != got[k]]
    diffs += [f"{k} is not rebuilt" for k in want if k not in got]
    diffs += [f"{k} is rebuilt but not in the model" for k in got if k not in want]
    if diffs:
        raise ArtifactError(
            f"cannot save: the architecture was changed without being recorded ({'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''}), so the artifact could not be loaded; make changes with "
            "torchslim.edits.replace_module (or set_attribute, delete_module, resize_tensor)")


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of the files of an artifact directory that hold the model: all but the copy
    of a ``py:`` model's Python file (``source.py``: code, the same before and after any
    compression, so counting it would only blur size ratios)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f != path / SOURCE_CODE)


def encoded_bytes(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``{state_dict name: (encoding, bytes of its parts)}`` of a saved artifact, from its manifest
    and the safetensors header (tied tensors: the stored name only). Sizes of the tensor data,
    without the file's header and the manifest (which ``artifact_size`` counts)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    with open(path / TENSORS, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return {name: (info["encoding"], sum(size[k] for k in info["parts"].values()))
            for name, info in manifest["tensors"].items()}


def state_dict_size(model: nn.Module) -> int:
    """Bytes of ``model``'s state_dict written as one safetensors file (tied tensors once): the
    size of a module torchslim cannot save as an artifact (no source record)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / TENSORS
        save_model(model, str(f))
        return f.stat().st_size


# -- reading ------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A short description of a manifest value for an error message."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list {json.dumps(value)[:40]}" if len(json.dumps(value)) <= 40 else "a list"
    if value is None:
        return "null (or missing)"
    return f"{type(value).__name__} {json.dumps(value)[:60]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Raises ArtifactError naming the manifest key whose value has the wrong form."""

    def __init__(self, mf: Path) -> None:
        self.mf = mf

    def need(self, ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise ArtifactError(f"{self.mf}: malformed manifest: {key} must be {expected}, got {_show(value)}; "
                                "the artifact is damaged or was edited: save the model again")

    def mapping(self, value: Any, key: str) -> dict:
        self.need(isinstance(value, dict), key, "a mapping", value)
        return value

    def string(self, value: Any, key: str) -> str:
        self.need(isinstance(value, str) and value != "", key, "a non-empty string", value)
        return value


def validate_manifest(manifest: dict[str, Any], mf: Path) -> None:
    """Check the structure of every manifest key that loading uses, before any of it is used."""
    c = _Checker(mf)
    files = c.mapping(manifest.get("files"), '"files"')
    c.need(TENSORS in files, '"files"', f"a mapping with an entry for {TENSORS}", files)
    for fname, info in files.items():
        key = f'"files"[{fname!r}]'
        c.need(fname not in ("", ".", "..") and Path(fname).name == fname and "\\" not in fname, key,
               "named by a plain file name inside the artifact directory", fname)
        info = c.mapping(info, key)
        sha = info.get("sha256")
        c.need(isinstance(sha, str) and len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha),
               f"{key}.sha256", "64 hexadecimal digits", sha)
        c.need(_is_int(info.get("bytes")) and info["bytes"] >= 0, f"{key}.bytes",
               "a non-negative integer", info.get("bytes"))

    source = c.mapping(manifest.get("source"), '"source"')
    spec = c.string(source.get("spec"), '"source".spec')
    c.need(source.get("args") is None or isinstance(source["args"], dict), '"source".args',
           "a mapping of builder arguments", source.get("args"))
    prefix = spec.partition(":")[0]
    c.need(prefix != "artifact", '"source".spec', "the spec of a base architecture (zoo:, torchvision:, "
           "hf:, py:), not another artifact", spec)
    if prefix == "py":
        c.string(source.get("file"), '"source".file')
        c.string(source.get("factory"), '"source".factory')
        if "code" in source:  # the copied file: listed in "files", so its sha256 is checked
            c.need(source["code"] in files, '"source".code', 'a file listed in "files"', source["code"])
    out = source.get("output")
    c.need(out is None or (_is_int(out)) or (isinstance(out, str) and out != ""), '"source".output',
           "an output index or name", out)

    if manifest["format_version"] >= 3:
        validate_edits(manifest.get("edits", []), str(mf))
    else:  # versions 1-2: {module name: {class, args}} swaps, read as "module" edits
        modules = c.mapping(manifest.get("modules", {}), '"modules"')
        for name, record in modules.items():
            key = f'"modules"[{name!r}]'
            c.need(name != "", '"modules"', "keyed by module names", name)
            record = c.mapping(record, key)
            c.string(record.get("class"), f"{key}.class")
            c.need(isinstance(record.get("args", {}), dict), f"{key}.args", "a mapping of constructor arguments",
                   record.get("args"))

    tensors = c.mapping(manifest.get("tensors"), '"tensors"')
    for name, info in tensors.items():
        key = f'"tensors"[{name!r}]'
        info = c.mapping(info, key)
        enc = info.get("encoding")
        c.need(isinstance(enc, str) and enc in ENCODINGS, f"{key}.encoding", f"one of {', '.join(ENCODINGS)}", enc)
        shape = info.get("shape")
        c.need(isinstance(shape, list) and all(_is_int(d) and 0 <= d < 2**62 for d in shape), f"{key}.shape",
               "a list of non-negative integers", shape)
        c.need(isinstance(info.get("dtype"), str) and info.get("dtype") in DTYPES, f"{key}.dtype", f"one of {', '.join(DTYPES)}", info.get("dtype"))
        parts = c.mapping(info.get("parts"), f"{key}.parts")
        c.need(all(isinstance(k, str) for k in parts.values()), f"{key}.parts",
               "a mapping of part names to tensor names in the safetensors file", parts)
        c.need(isinstance(info.get("meta", {}), dict), f"{key}.meta", "a mapping", info.get("meta"))

    pre = manifest.get("preprocessing")
    c.need(pre is None or isinstance(pre, dict), '"preprocessing"', "a mapping or null", pre)

    aliases = c.mapping(manifest.get("aliases", {}), '"aliases"')
    for alias, target in aliases.items():
        key = f'"aliases"[{alias!r}]'
        c.need(alias not in tensors, key, "a name that is not also stored in \"tensors\"", alias)
        c.need(isinstance(target, str) and target in tensors, key, "the name of a stored tensor", target)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed and structurally checked ``manifest.json`` of the artifact at ``path``."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a torchslim artifact: {MANIFEST} is missing")
    try:
        size = mf.stat().st_size
        if size > MAX_MANIFEST_BYTES:  # refused unread: a manifest of a large model is a few MiB
            raise ArtifactError(f"{mf}: {size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,} bytes")
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{mf}: corrupt manifest: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"{mf}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "torchslim-artifact":
        raise ArtifactError(f"{mf}: not a torchslim artifact manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise ArtifactError(f"{mf}: malformed manifest: \"format_version\" must be a positive integer, "
                            f"got {_show(version)}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{mf}: artifact format version {version!r} is newer than this torchslim "
                            f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade torchslim")
    validate_manifest(manifest, mf)
    return manifest


def read_preprocessing(path: str | os.PathLike) -> dict[str, Any] | None:
    """The preprocessing recorded with the artifact at ``path`` (see the module doc), or None
    when none was recorded (also for artifacts written before the field existed).

    Examples
    --------
    >>> import tempfile, torchslim
    >>> d = tempfile.mkdtemp() + "/model"
    >>> task = torchslim.build_task("digits")
    >>> _ = torchslim.save(torchslim.build_model("zoo:digits-cnn"), d, preprocessing=task.preprocessing)
    >>> read_preprocessing(d)["mean"]
    [0.3049]
    """
    return read_manifest(path).get("preprocessing")


def code_trusted(trust_code: bool = False) -> bool:
    """Whether importing a ``py:`` model's file is allowed: ``trust_code``, or the environment
    variable ``TORCHSLIM_TRUST_CODE`` set to 1 (``--trust-code`` sets it)."""
    return trust_code or os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _reason(exc: BaseException) -> str:
    """An exception as one short line: the message of a UserError, else type and message."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, UserError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding state_dict entry ``name`` and its attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return get_submodule(model, module_name), attr


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias the very tensor it was saved as (the rebuild may not tie by itself)."""
    for alias, target in aliases.items():
        try:
            owner_a, attr_a = _owner(model, alias)
            owner_t, attr_t = _owner(model, target)
        except AttributeError:
            continue  # a state_dict name that is not a plain attribute path: values are loaded anyway
        want = getattr(owner_t, attr_t, None)
        if getattr(owner_a, attr_a, None) is want:
            continue
        if (attr_a in owner_a._parameters and isinstance(want, nn.Parameter)) or (
                attr_a in owner_a._buffers and attr_t in owner_t._buffers):
            setattr(owner_a, attr_a, want)


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """While building: every parameter and persistent buffer is moved to the meta device as it
    is registered (the artifact's tensors replace them), while non-persistent buffers (position
    ids, rotary tables, which no state_dict holds) keep the values the constructor computed.
    Each weight exists on the CPU only for the moment between its creation and registration.
    (The two registration methods are patched for the duration: no other thread may build
    modules meanwhile.)"""
    reg_param, reg_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        reg_param(self, name, param)
        p = self._parameters.get(name)
        if type(p) is nn.Parameter and p.device.type != "meta":  # subclasses (lazy ones) stay as built
            new = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)
            self._parameters[name] = new

    def register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        reg_buffer(self, name, tensor, persistent)
        b = self._buffers.get(name)
        if persistent and b is not None and b.device.type != "meta":
            self._buffers[name] = b.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_param, reg_buffer


def _rebuild(path: Path, source: dict[str, Any], edits: list[dict[str, Any]], *, mode: str) -> nn.Module:
    """The source architecture with ``edits`` replayed. ``mode``: ``meta`` (every tensor on the
    meta device: nothing allocated, whatever the manifest's sizes), ``weights`` (weights on meta,
    non-persistent buffers computed for real, see :func:`_weights_on_meta`) or ``cpu``."""
    def where() -> Any:
        return {"meta": lambda: torch.device("meta"), "weights": _weights_on_meta,
                "cpu": contextlib.nullcontext}[mode]()

    try:
        with where():
            model = rebuild_from_source(source)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the builder returned {type(model).__name__}, not an nn.Module")
    except Exception as exc:  # any failure of a builder on these arguments is a bad manifest
        if mode != "cpu":  # a builder that computes with its tensors at construction needs real ones
            return _rebuild(path, source, edits, mode="cpu")
        raise ArtifactError(f"{path}: cannot rebuild the architecture from source {source['spec']!r} "
                            f"with args {source.get('args') or {}}: {_reason(exc)}") from None
    with where():
        replay(model, edits, str(path))
    return model


def _on_meta(model: nn.Module, exclude: dict[str, Any]) -> bool:
    """Whether a parameter or buffer that ``exclude`` does not replace is still on meta."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return any(t.device.type == "meta" for n, t in named.items() if n not in exclude)


def load(path: str | os.PathLike, *, trust_code: bool = False, trusted_code: Collection[str] = ()) -> nn.Module:
    """Rebuild the model saved at ``path``, checking the manifest, checksums, keys, shapes, dtypes.

    Parameters
    ----------
    path : path
        An artifact directory written by :func:`save`.
    trust_code : bool
        An artifact of a ``py:FILE.py:FACTORY`` model names a Python file that rebuilding the
        architecture imports (runs). That is refused unless ``trust_code=True`` or the
        environment variable ``TORCHSLIM_TRUST_CODE=1``: pass it only for artifacts you trust,
        as anyone who can edit ``manifest.json`` can point it at another file.
    trusted_code : collection of str
        sha256 digests (hex) of Python files the caller vouches for without trusting every
        file: a run resuming from its checkpoints passes those of the ``py:`` files its own
        recipe names, so a checkpoint pointing at any other file is refused.
    """
    from safetensors.torch import load_file

    from .weights import check_state_dict

    path = Path(path)
    manifest = read_manifest(path)
    source, tensors = manifest["source"], manifest["tensors"]
    aliases = manifest.get("aliases", {})
    if manifest["format_version"] >= 3:
        edits = manifest.get("edits", [])
    else:
        edits = [{"op": "module", "target": name, "class": rec["class"], "args": rec.get("args", {})}
                 for name, rec in manifest.get("modules", {}).items()]
    for fname, info in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            raise ArtifactError(f"{path}: data file {fname} is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise ArtifactError(f"{f}: checksum mismatch: the file is truncated or was modified")
    if source["spec"].partition(":")[0] == "py":
        code = path / source["code"] if "code" in source else Path(source["file"])
        if not code_trusted(trust_code) and not (trusted_code and code.is_file() and _sha256(code) in trusted_code):
            raise ArtifactError(
                f"{path}: refused: rebuilding this model imports and runs the Python file {code} "
                f"({'a copy of ' + source['file'] + ', ' if 'code' in source else ''}"
                f"source {source['spec']!r}); if you trust it, pass --trust-code (command line), "
                f"trust_code=True (torchslim.load) or set the environment variable {TRUST_ENV}=1")
        source = {**source, "file": str(code.resolve())}  # the copy (checked above), not the original
    try:
        parts = load_file(str(path / TENSORS))
    except Exception as exc:  # SafetensorError, OSError, ... : the checksum matched a bad file
        raise ArtifactError(f"{path / TENSORS}: unreadable: {_reason(exc)}") from None

    # -- names, shapes and dtypes of the stored tensors ---------------------------------------
    try:
        declared = {n: torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], device="meta")
                    for n, info in tensors.items()}
    except (RuntimeError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"{path}: malformed manifest: a tensor shape is impossible: {_reason(exc)}") from None
    declared.update({alias: declared[target] for alias, target in aliases.items()})

    # -- the architecture on the meta device, the edit log replayed, checked against the tensors
    model = _rebuild(path, source, edits, mode="meta")
    check_state_dict(model, declared, str(path))

    state: dict[str, torch.Tensor] = {}
    for name, info in tensors.items():
        missing = [k for k in info["parts"].values() if k not in parts]
        if missing:
            raise ArtifactError(f"{path}: tensor {name!r}: part {missing[0]!r} is not in {TENSORS}")
        try:
            state[name] = decode_tensor(info["encoding"], {p: parts[k] for p, k in info["parts"].items()},
                                        info.get("meta", {}), tuple(info["shape"]), DTYPES[info["dtype"]])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise ArtifactError(f"{path}: tensor {name!r} cannot be decoded: {_reason(exc)}") from None
    # safetensors places tensors at 8-byte offsets; CPU kernels (oneDNN) choose their code path by
    # the alignment of their operands, so a copy in freshly allocated (64-byte aligned) memory keeps
    # the reloaded model's outputs bit-identical to the saved one's
    state = {n: t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t for n, t in state.items()}
    state.update({alias: state[target] for alias, target in aliases.items()})
    if _on_meta(model, exclude=state):
        # non-persistent buffers (position ids, rotary tables) are in no state_dict and have no
        # values on meta: build again with only the weights on meta (the shapes are checked, so
        # each weight's brief CPU allocation is bounded by the artifact), else for real
        model = _rebuild(path, source, edits, mode="weights")
        if _on_meta(model, exclude=state):
            model = _rebuild(path, source, edits, mode="cpu")
    # the modules' state_dict versions, which some read on loading (torchvision's MNASNet refuses none)
    state = collections.OrderedDict(state)
    state._metadata = getattr(model.state_dict(keep_vars=True), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True, assign=True)  # stored dtypes win
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: tensors do not load into the model: {_reason(exc)}") from None
    _retie(model, aliases)
    model.eval()
    return model


@register_model_source("artifact")
def _artifact_source(path: str, args: dict) -> tuple[nn.Module, dict]:
    """``artifact:DIR``: a model saved by torchslim; it keeps its own source record, which
    rebuilds the architecture without the artifact."""
    from .errors import SpecError

    if args:
        raise SpecError("artifact: models take no builder arguments")
    model = load(path)
    return model, dict(getattr(model, SOURCE_ATTR, {}))
