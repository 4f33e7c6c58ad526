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


# -- bit packing of small integers ---------------------------------------------------------
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def code_bits(t: torch.Tensor) -> tuple[int, int] | None:
    """``(bits, offset)`` when every element of an integer tensor lies in
    ``[offset, offset + 2**bits)`` with ``bits < 8`` (codes worth packing), else None.

    Examples
    --------
    >>> code_bits(torch.tensor([-8, 0, 7], dtype=torch.int8))
    (4, -8)
    >>> code_bits(torch.tensor([-100, 100], dtype=torch.int8)) is None
    True
    """
    if t.dtype not in _INT_DTYPES or t.numel() == 0:
        return None
    lo, hi = int(t.min()), int(t.max())
    bits = max(int(hi - lo).bit_length(), 1)
    return (bits, lo) if bits < 8 else None


def pack_bits(t: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """``t - offset`` as ``bits``-bit unsigned codes packed into bytes, little-endian bit order:
    ``ceil(numel * bits / 8)`` uint8 (4-bit: two codes per byte, 2-bit: four, 3-bit: 8 codes in
    3 bytes)."""
    u = (t.reshape(-1).to(torch.int64) - offset).numpy().astype(np.uint8)          # (n,)
    b = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]             # (n, bits)
    return torch.from_numpy(np.packbits(b.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int, bits: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes as ``dtype``; ValueError when too few bytes."""
    if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"packed codes: {packed.numel()} bytes of {packed.dtype} cannot hold {n} "
                         f"{bits}-bit codes")
    b = np.unpackbits(packed.numpy(), bitorder="little", count=n * bits).reshape(n, bits)
    u = np.packbits(np.pad(b, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little")[:, 0]
    return (torch.from_numpy(u.astype(np.int64)) + offset).to(dtype)


def _check_bits(meta: dict[str, Any]) -> tuple[int, int]:
    bits, offset = meta.get("bits"), meta.get("offset")
    if not (isinstance(bits, int) and 1 <= bits <= 7 and isinstance(offset, int) and -2**31 <= offset < 2**31):
        raise ValueError(f"packed codes need integer meta bits in 1..7 and offset, got {bits!r}, {offset!r}")
    return bits, offset


def _packed_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    found = code_bits(t)
    if found is None:
        return None
    bits, offset = found
    return {"data": pack_bits(t, bits, offset)}, {"bits": bits, "offset": offset}


def _packed_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _INT_DTYPES:
        raise ValueError(f"packed codes decode to integer dtypes only, the manifest says {dtype}")
    bits, offset = _check_bits(meta)
    return unpack_bits(parts["data"], _numel(shape), bits, offset, dtype).reshape(shape)


register_encoding(Encoding("packed", _packed_encode, _packed_decode))


# -- bitmask: one bit per element that differs from the fill + those values in order ----------
def _row_fill(t: torch.Tensor) -> torch.Tensor | None:
    """Per-row most frequent value of an integer tensor of >= 2 dims (the zero point of an
    affine-quantized pruned weight: its pruned codes all equal the row's zero point)."""
    if t.dtype not in _INT_DTYPES or t.dim() < 2 or t.shape[0] == 0:
        return None
    fill = torch.mode(t.reshape(t.shape[0], -1).to(torch.int64), dim=1).values
    return None if bool((fill == 0).all()) else fill.to(t.dtype)


def _bitmask_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if t.numel() < 64 or t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.uint8, torch.int16, torch.int32)):
        return None
    fill = _row_fill(t)
    if fill is not None:                                       # (rows,) fill value of each row
        rows = t.reshape(t.shape[0], -1)
        mask = (rows != fill[:, None]).reshape(-1)
    else:
        mask = t.reshape(-1) != 0
    flat = t.reshape(-1)
    if t.is_floating_point():
        mask |= torch.signbit(flat)  # -0.0 is kept as a value: the decoder fills +0.0 only
    packed = np.packbits(mask.numpy(), bitorder="little")          # (ceil(n/8),) uint8
    values = flat[mask].clone()
    parts: dict[str, torch.Tensor] = {"mask": torch.from_numpy(packed)}
    meta: dict[str, Any] = {}
    found = code_bits(values)
    if found is not None:                                      # small integer codes: packed too
        meta["bits"], meta["offset"] = found
        parts["values"] = pack_bits(values, *found)
        meta["count"] = values.numel()
    else:
        parts["values"] = values
    if fill is not None:
        parts["fill"] = fill
    return parts, meta


def _bitmask_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
    n = _numel(shape)
    packed = check_part(parts, "mask", torch.uint8, (n + 7) // 8)
    bits = np.unpackbits(packed.numpy(), bitorder="little", count=n).astype(bool)
    mask = torch.from_numpy(bits)
    ones = int(mask.sum())
    if "bits" in meta:
        if dtype not in _INT_DTYPES:
            raise ValueError(f"packed values decode to integer dtypes only, the manifest says {dtype}")
        if meta.get("count") != ones:
            raise ValueError(f"bitmask holds {ones} ones but the manifest counts {meta.get('count')!r} values")
        values = unpack_bits(parts["values"], ones, *_check_bits(meta), dtype)
    else:
        values = check_part(parts, "values", dtype)
    if ones != values.numel():
        raise ValueError(f"bitmask holds {ones} ones but {values.numel()} values")
    if "fill" in parts:
        rows = shape[0] if shape else 0
        fill = check_part(parts, "fill", dtype, rows)
        out = fill.reshape(-1, 1).expand(rows, n // max(rows, 1)).reshape(-1).clone()
    else:
        out = torch.zeros(n, dtype=dtype)
    out[mask] = values.reshape(-1)
    return out.reshape(shape)


register_encoding(Encoding("bitmask", _bitmask_encode, _bitmask_decode))
