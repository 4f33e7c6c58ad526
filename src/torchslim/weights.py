"""Safe weight loading: safetensors or a plain-tensor ``torch.save`` file, nothing executable."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError

_SAVE_HINT = ("save a plain state_dict (torch.save(model.state_dict(), PATH)) "
              "or a safetensors file instead")
# torch's own advice around a weights_only refusal, which is not ours to repeat
_TORCH_BOILERPLATE = ("Weights only load failed", "In PyTorch", "Re-running", "Please file an issue",
                      "Check the documentation", "WeightsUnpickler error:")


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length, then the JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _refusal(path: Path, exc: pickle.UnpicklingError) -> ArtifactError:
    """Our message for a pickle that torch's ``weights_only`` loader rejects."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = re.sub(r"^(posix|nt)\.", "os.", found.group(1))  # os.system pickles as posix.system
        return ArtifactError(
            f"{path}: refused: the file holds Python objects other than tensors (it asks for {name!r}); "
            f"it was read with weights_only=True and nothing in it was executed: {_SAVE_HINT}")
    lines = [ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in text.splitlines()]
    detail = next((ln for ln in lines if ln and not ln.startswith(_TORCH_BOILERPLATE)), "")
    return ArtifactError(
        f"{path}: refused: not a plain tensor checkpoint{f' ({detail[:120]})' if detail else ''}; it was read "
        f"with weights_only=True and nothing in it was executed: {_SAVE_HINT}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError, ...: all mean "unreadable"
        raise ArtifactError(f"{path}: not a readable safetensors file: "
                            f"{' '.join(str(exc).split())[:200] or type(exc).__name__}") from None


#: how much larger than the file its members may unpack to: ``torch.save`` stores them
#: uncompressed, so a deflated member is a zip bomb rather than a checkpoint
MAX_UNPACK_RATIO = 4


def _check_zip(path: Path) -> None:
    """Refuse a zip whose members would unpack to far more than the file holds (``torch.save``
    writes stored, uncompressed members), before ``torch.load`` inflates anything."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
    except Exception as exc:  # BadZipFile, NotImplementedError (unknown zip version), OSError, ...
        raise ArtifactError(f"{path}: cannot read weights: a damaged zip ({type(exc).__name__}: "
                            f"{str(exc)[:120]})") from None
    size = path.stat().st_size
    if unpacked > MAX_UNPACK_RATIO * size + (1 << 20):
        raise ArtifactError(f"{path}: refused: its zip members unpack to {unpacked:,} bytes from a {size:,}-byte "
                            "file; torch.save stores tensors uncompressed, so this is not a checkpoint")


def _torch_load(path: Path) -> object:
    _check_zip(path)
    try:
        with warnings.catch_warnings():
            # torch warns about any pickle protocol but 2 and about sparse tensors it validates;
            # the file is refused or accepted below with our own message either way
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"Validating sparse tensor", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # KeyError, EOFError, RuntimeError, BadZipFile, ...: not a checkpoint at all
        if _looks_like_text(path):
            what = "it is a text file"
        else:
            reason = " ".join(str(exc).split())[:120]
            what = (f"not a safetensors file or a torch.save checkpoint "
                    f"({type(exc).__name__}{': ' + reason if reason else ''})")
        raise ArtifactError(f"{path}: cannot read weights: {what}; expected a state_dict saved with "
                            "torch.save or a .safetensors file") from None


def _check_plain(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that a model's dense real-valued parameters cannot take as they are."""
    for key, t in state.items():
        if t.is_nested:
            problem = "a nested tensor; save regular dense tensors"
        elif t.layout != torch.strided:
            problem = (f"a sparse tensor (layout {str(t.layout).removeprefix('torch.')}); "
                       "save it dense (tensor.to_dense())")
        elif t.is_meta:
            problem = "a meta tensor (a shape without values); save the real weights"
        elif t.is_quantized:
            problem = f"a torch quantized tensor ({t.dtype}); save the float weights"
        elif t.is_complex():
            problem = f"complex ({str(t.dtype).removeprefix('torch.')}); model weights must be real"
        else:
            continue
        raise ArtifactError(f"{path}: refused: {key} is {problem}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a safetensors file or a ``torch.save`` file of plain tensors.

    ``torch.load`` runs with ``weights_only=True``: a file holding anything but tensors and
    plain containers is refused and nothing in it is executed. Any file that cannot be read as
    either format raises :class:`ArtifactError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        is_safetensors = path.suffix == ".safetensors" or _looks_like_safetensors(path)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    obj = _read_safetensors(path) if is_safetensors else _torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a mapping of parameter names to tensors (a state_dict), "
                            f"got {type(obj).__name__}")
    for k, v in obj.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise ArtifactError(f"{path}: expected a mapping of parameter names to tensors (a state_dict), "
                                f"but entry {k!r} holds {type(v).__name__}")
    _check_plain(path, obj)
    return obj


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``, checking every key, shape and dtype."""
    state = read_state_dict(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ArtifactError unless ``state`` has exactly the model's keys, shapes and kinds of dtype.

    Floating-point precision may differ (a float16 file into a float32 model is normal and is
    cast on load); any other dtype difference (integer codes, bool masks) is refused.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ArtifactError(f"{where}: weights do not fit the model: {'; '.join(parts)}")
    for key, tensor in state.items():
        want = own[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ArtifactError(f"{where}: {key} has shape {tuple(tensor.shape)}, "
                                f"the model expects {tuple(want.shape)}")
        if tensor.dtype != want.dtype and not (tensor.is_floating_point() and want.is_floating_point()):
            raise ArtifactError(f"{where}: {key} has dtype {_dtype_name(tensor.dtype)}, the model expects "
                                f"{_dtype_name(want.dtype)}; only floating-point precision may differ")
