"""Safe weight loading: safetensors or a plain-tensor ``torch.save`` file, nothing executable."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a safetensors file or a ``torch.save`` file of plain tensors.

    ``torch.load`` runs with ``weights_only=True``: a file holding anything but tensors and
    plain containers is refused and nothing in it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(
            f"{path}: refused: not a plain tensor checkpoint (loaded with weights_only=True, "
            f"nothing was executed): {first[:200]}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ArtifactError(f"{path}: expected a mapping of parameter names to tensors (a state_dict)")
    return obj


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``, checking every key and shape."""
    state = read_state_dict(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
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
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ArtifactError(f"{where}: {key} has shape {tuple(tensor.shape)}, "
                                f"the model expects {tuple(own[key].shape)}")
