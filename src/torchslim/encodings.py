"""Per-tensor storage encodings for artifacts.

An encoding turns one tensor into named parts (tensors stored in safetensors) plus a little
JSON metadata, and back. The artifact writer tries every registered encoding that accepts a
tensor and keeps the smallest, so a 90%-sparse weight is stored as a bitmask plus its non-zero
values without any method having to ask for it. New encodings (packed 4-bit codes, codebooks)
register here with :func:`register_encoding`.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Encoding:
    name: str
    #: tensor -> (parts, meta) or None when the encoding does not apply
    encode: Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, Any]] | None]
    #: (parts, meta, shape, dtype) -> tensor
    decode: Callable[[dict[str, torch.Tensor], dict[str, Any], tuple[int, ...], torch.dtype], torch.Tensor]


ENCODINGS: dict[str, Encoding] = {}


def register_encoding(enc: Encoding) -> Encoding:
    ENCODINGS[enc.name] = enc
    return enc


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode_tensor(t: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The smallest applicable encoding of ``t``: ``(name, parts, meta)``."""
    t = t.detach().cpu().contiguous()
    best = None
    for enc in ENCODINGS.values():
        out = enc.encode(t)
        if out is None:
            continue
        size = _nbytes(out[0])
        if best is None or size < best[0]:
            best = (size, enc.name, out[0], out[1])
    assert best is not None  # "dense" always applies
    return best[1], best[2], best[3]


def decode_tensor(name: str, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                  shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a tensor of ``shape`` and ``dtype``; ``ValueError`` when the parts do not fit.

    Stored values must already have ``dtype``: nothing is cast, so a manifest whose dtype was
    edited is refused instead of silently changing the weights.
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}")
    try:
        return ENCODINGS[name].decode(parts, meta, shape, dtype)
    except KeyError as exc:
        raise ValueError(f"encoding {name!r} needs part {exc}, the manifest lists {sorted(parts)}") from None


def check_part(parts: dict[str, torch.Tensor], part: str, dtype: torch.dtype,
               numel: int | None = None) -> torch.Tensor:
    """``parts[part]``, checked to be stored as ``dtype`` (and to hold ``numel`` elements)."""
    t = parts[part]
    if t.dtype != dtype:
        raise ValueError(f"part {part!r} is stored as {str(t.dtype).removeprefix('torch.')} but the "
                         f"manifest says {str(dtype).removeprefix('torch.')}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"part {part!r} holds {t.numel()} elements, {numel} expected")
    return t


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# -- dense --------------------------------------------------------------------------------
register_encoding(Encoding(
    "dense",
    lambda t: ({"data": t.clone()}, {}),
    lambda parts, meta, shape, dtype: check_part(parts, "data", dtype, _numel(shape)).reshape(shape),
))


# -- bitmask: one bit per element + the non-zero values in order --------------------------
def _bitmask_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if t.numel() < 64 or t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.uint8, torch.int16, torch.int32)):
        return None
    flat = t.reshape(-1)
    mask = flat != 0
    if t.is_floating_point():
        mask |= torch.signbit(flat)  # -0.0 is kept as a value: the decoder fills +0.0 only
    packed = np.packbits(mask.numpy(), bitorder="little")          # (ceil(n/8),) uint8
    return {"mask": torch.from_numpy(packed), "values": flat[mask].clone()}, {}


def _bitmask_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
    n = _numel(shape)
    packed = check_part(parts, "mask", torch.uint8, (n + 7) // 8)
    bits = np.unpackbits(packed.numpy(), bitorder="little", count=n).astype(bool)
    mask = torch.from_numpy(bits)
    values = check_part(parts, "values", dtype)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask holds {int(mask.sum())} ones but {values.numel()} values")
    out = torch.zeros(n, dtype=dtype)
    out[mask] = values.reshape(-1)
    return out.reshape(shape)


register_encoding(Encoding("bitmask", _bitmask_encode, _bitmask_decode))
