"""Per-tensor storage encodings for artifacts.

An encoding turns one tensor into named parts (tensors stored in safetensors) plus a little
JSON metadata, and back. The artifact writer tries every registered encoding that accepts a
tensor and keeps the smallest, so a 90%-sparse weight is stored as a bitmask plus its non-zero
values without any method having to ask for it. New encodings (packed 4-bit codes, codebooks)
register here with :func:`register_encoding`.

Sparse tensors have three encodings, and the smallest wins per tensor: ``bitmask`` (one bit per
element + the non-zeros: best from about 10% to 90% density), ``relative-index`` (Deep
Compression's 4- or 8-bit gaps between non-zeros: best when very sparse) and ``nm`` (N values of
every M with the rank of their positions: N:M-pruned weights, 2:4 below a bitmask).

Integer codes may also be entropy-coded (``ans``, ``relative-index-ans``: :mod:`torchslim.entropy`, registered by the artifact module,
with the optional ``constriction`` package), again only where that is the smallest.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
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
    #: the artifact format version that introduced it (the writer records the newest one used,
    #: so an older torchslim says "upgrade" instead of failing on an unknown encoding)
    since: int = 1
    #: stores zeros implicitly (bitmask, relative-index, nm): counted in ``bits_per_nonzero``
    sparse: bool = False


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
    """``t - offset`` as ``bits``-bit unsigned codes (``bits`` <= 16) packed into bytes,
    little-endian bit order: ``ceil(numel * bits / 8)`` uint8 (4-bit: two codes per byte, 2-bit:
    four, 3-bit: 8 codes in 3 bytes)."""
    u = (t.reshape(-1).to(torch.int64) - offset).numpy().astype("<u2").view(np.uint8)  # (2n,) bytes
    b = np.unpackbits(u.reshape(-1, 2), axis=1, bitorder="little")[:, :bits]          # (n, bits)
    return torch.from_numpy(np.packbits(b.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int, bits: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes as ``dtype``; ValueError when too few bytes."""
    if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"packed codes: {packed.numel()} bytes of {packed.dtype} cannot hold {n} "
                         f"{bits}-bit codes")
    b = np.unpackbits(packed.numpy(), bitorder="little", count=n * bits).reshape(n, bits)
    u = np.packbits(np.pad(b, ((0, 0), (0, 16 - bits))), axis=1, bitorder="little").view("<u2")[:, 0]
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


# -- what the sparse encodings share: the fill, the stored entries, their values ---------------
def _row_fill(t: torch.Tensor) -> torch.Tensor | None:
    """Per-row most frequent value of an integer tensor of >= 2 dims (the zero point of an
    affine-quantized pruned weight: its pruned codes all equal the row's zero point)."""
    if t.dtype not in _INT_DTYPES or t.dim() < 2 or t.shape[0] == 0:
        return None
    fill = torch.mode(t.reshape(t.shape[0], -1).to(torch.int64), dim=1).values
    return None if bool((fill == 0).all()) else fill.to(t.dtype)


def _stored_mask(t: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """Flat mask of the entries a sparse encoding keeps as values: those differing from the
    row's fill (0 without one), and -0.0 (decoders fill +0.0 only)."""
    if fill is not None:
        stored = (t.reshape(t.shape[0], -1) != fill[:, None]).reshape(-1)
    else:
        stored = t.reshape(-1) != 0
    return stored | _signbit(t.reshape(-1)) if t.is_floating_point() else stored


def _signbit(t: torch.Tensor) -> torch.Tensor:
    """``torch.signbit``, also for the fp8 dtypes (which have no CPU kernel for it): the sign is
    the top bit of the stored integer."""
    if t.element_size() == 1:
        return t.view(torch.int8) < 0
    return torch.signbit(t)


def _sparse_split(t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """``(fill, stored)`` (:func:`_row_fill`, :func:`_stored_mask`) for a tensor a sparse
    encoding may take: >= 64 elements of a float or int8/uint8/int16/int32 dtype; else None."""
    if t.numel() < 64 or not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int16,
                                                                     torch.int32)):
        return None
    fill = _row_fill(t)
    return fill, _stored_mask(t, fill)


def stored_nonzeros(t: torch.Tensor) -> int:
    """Entries of ``t`` the sparse encodings store as values: those differing from the fill
    (0, or a quantized row's zero point), -0.0 included."""
    t = t.detach()
    return int(_stored_mask(t, _row_fill(t)).sum())


def _values_parts(values: torch.Tensor, fill: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored values (small integer codes bit-packed: meta ``bits``, ``offset``, ``count``)
    and the per-row ``fill`` when there is one."""
    parts: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    found = code_bits(values)
    if found is not None:
        meta["bits"], meta["offset"] = found
        parts["values"] = pack_bits(values, *found)
        meta["count"] = values.numel()
    else:
        parts["values"] = values.clone()
    if fill is not None:
        parts["fill"] = fill
    return parts, meta


def _value_bits(values: torch.Tensor) -> int:
    """Bits each value takes in :func:`_values_parts`."""
    found = code_bits(values)
    return found[0] if found is not None else 8 * values.element_size()


def _read_values(parts: dict[str, torch.Tensor], meta: dict[str, Any], count: int, dtype: torch.dtype,
                 what: str) -> torch.Tensor:
    """Inverse of :func:`_values_parts`: ``count`` values; ValueError when they do not fit."""
    if "bits" in meta:
        if dtype not in _INT_DTYPES:
            raise ValueError(f"packed values decode to integer dtypes only, the manifest says {dtype}")
        if meta.get("count") != count:
            raise ValueError(f"{what} {count} values but the manifest counts {meta.get('count')!r}")
        return unpack_bits(parts["values"], count, *_check_bits(meta), dtype)
    values = check_part(parts, "values", dtype)
    if values.numel() != count:
        raise ValueError(f"{what} {count} values but {values.numel()} are stored")
    return values.reshape(-1)


def _filled(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``shape``'s size holding each row's fill (zeros without one)."""
    n = _numel(shape)
    if "fill" not in parts:
        return torch.zeros(n, dtype=dtype)
    rows = shape[0] if shape else 0
    fill = check_part(parts, "fill", dtype, rows)
    return fill.reshape(-1, 1).expand(rows, n // max(rows, 1)).reshape(-1).clone()


# -- bitmask: one bit per element that differs from the fill + those values in order ----------
def _bitmask_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    split = _sparse_split(t)
    if split is None:
        return None
    fill, mask = split
    parts, meta = _values_parts(t.reshape(-1)[mask], fill)
    parts["mask"] = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))   # (ceil(n/8),) uint8
    return parts, meta


def _bitmask_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
    n = _numel(shape)
    packed = check_part(parts, "mask", torch.uint8, (n + 7) // 8)
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), bitorder="little", count=n).astype(bool))
    values = _read_values(parts, meta, int(mask.sum()), dtype, "bitmask holds ones for")
    out = _filled(parts, shape, dtype)
    out[mask] = values
    return out.reshape(shape)


register_encoding(Encoding("bitmask", _bitmask_encode, _bitmask_decode, sparse=True))


# -- relative-index: gaps between stored entries in 4- or 8-bit codes, padding for long gaps ----
def relative_split(t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(fill, flat, pos, skips)`` of a tensor a sparse encoding may take (else None): the
    row fill (:func:`_row_fill`), ``t`` flattened, the ascending positions of its stored entries
    (nnz,) and the number of fill entries before each (nnz,)."""
    split = _sparse_split(t)
    if split is None:
        return None
    fill, stored = split
    pos = stored.nonzero().squeeze(1)                                         # (nnz,) ascending
    skips = torch.diff(pos, prepend=torch.tensor([-1])) - 1                   # fill entries before each
    return fill, t.reshape(-1), pos, skips


def relative_gaps(skips: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gaps, where)``: the ``bits``-bit gap of every entry of the relative-index coding
    (padding entries, gap ``2**bits - 1``, where a run of fill is longer) and the flat position
    of each entry (entries, int64)."""
    pads = skips >> bits                                                      # padding entries before each
    gaps = torch.full((skips.numel() + int(pads.sum()),), 2**bits - 1, dtype=torch.int64)
    gaps[(pads + 1).cumsum(0) - 1] = skips & (2**bits - 1)                    # each real entry's gap
    return gaps, (gaps + 1).cumsum(0) - 1


def _relative_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Deep Compression's sparse coding (Han et al. 2016, sec. 2): each stored entry is a value
    and the number of fill entries skipped before it, in ``index_bits`` (4 or 8, whichever is
    smaller for this tensor); a run longer than ``2**index_bits - 1`` gets padding entries (gap
    ``2**index_bits - 1``, holding the fill), each advancing ``2**index_bits`` positions.
    Trailing fill is implied by the shape; values and fill are stored as the bitmask stores them."""
    split = relative_split(t)
    if split is None:
        return None
    fill, flat, pos, skips = split
    value_bits = _value_bits(flat[pos])

    def size(bits: int) -> int:
        entries = pos.numel() + int((skips >> bits).sum())
        return (entries * bits + 7) // 8 + (entries * value_bits + 7) // 8

    bits = min((4, 8), key=size)
    gaps, where = relative_gaps(skips, bits)
    parts, meta = _values_parts(flat[where], fill)                            # padding entries hold the fill
    parts["gaps"] = pack_bits(gaps, bits, 0)
    return parts, {**meta, "index_bits": bits, "entries": gaps.numel()}


def _relative_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:
    bits, count = meta.get("index_bits"), meta.get("entries")
    if bits not in (4, 8) or not isinstance(count, int) or count < 0:
        raise ValueError(f"relative-index needs meta index_bits 4 or 8 and entries >= 0, got {bits!r}, {count!r}")
    n = _numel(shape)
    gaps = unpack_bits(parts["gaps"], count, bits, 0, torch.int64)
    values = _read_values(parts, meta, count, dtype, "relative-index gaps place")
    pos = (gaps + 1).cumsum(0) - 1                                            # (count,) ascending
    if count and int(pos[-1]) >= n:
        raise ValueError(f"relative-index gaps reach position {int(pos[-1])} of a tensor of {n} elements")
    out = _filled(parts, shape, dtype)
    out[pos] = values
    return out.reshape(shape)


register_encoding(Encoding("relative-index", _relative_encode, _relative_decode, since=4, sparse=True))


#: integer dtypes of the same width: gather/scatter of float tensors run on their bit patterns
_BIT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width when it is floating point: CPU ``gather`` of
    bfloat16 rewrites NaN payloads (0x7FC0 -> 0xFFFF), and the encodings are bit-exact."""
    return t.view(_BIT_VIEWS[t.element_size()]) if t.is_floating_point() else t


# -- nm: N values kept in every M consecutive elements + the rank of which N -----------------
#: group sizes tried; a rank needs ceil(log2(C(M, N))) bits (2:4 -> 3, 4:8 -> 7, 8:16 -> 14)
NM_GROUPS = (2, 4, 8, 16)


@functools.lru_cache(maxsize=None)
def _combinations(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, rank_of)``: ``table[r]`` the ``n`` ascending positions of combination ``r``
    (lexicographic) of ``range(m)``; ``rank_of[pattern]`` the rank of a bit pattern (-1: not
    ``n`` bits set)."""
    combos = list(itertools.combinations(range(m), n))
    table = torch.tensor(combos, dtype=torch.int64).reshape(len(combos), n)
    rank_of = torch.full((2**m,), -1, dtype=torch.int64)
    rank_of[(torch.ones(len(combos), n, dtype=torch.int64) << table).sum(1)] = torch.arange(len(combos))
    return table, rank_of


def _rank_bits(m: int, n: int) -> int:
    return (math.comb(m, n) - 1).bit_length()


def _nm_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """N:M storage: in every ``m`` consecutive elements (flat, storage order) at most ``n``
    differ from the fill; each group stores exactly ``n`` values (padded with fill entries) and
    the rank of its ``n`` positions among the C(m, n) combinations, bit-packed. For 2:4 that is 3
    bits a group (the hardware layout's 2-bit index per kept value takes 4, as many as a
    bitmask). ``m`` is the group size of :data:`NM_GROUPS` giving the fewest bytes; values and
    fill are stored as the bitmask stores them."""
    split = _sparse_split(t)
    if split is None:
        return None
    fill, stored = split
    flat = t.reshape(-1)
    value_bits = _value_bits(flat[stored])
    best = None
    for m in NM_GROUPS:
        if flat.numel() % m:
            continue
        groups = flat.numel() // m
        n = int(stored.reshape(groups, m).sum(1).max())
        if n < m:
            size = (groups * n * value_bits + 7) // 8 + (groups * _rank_bits(m, n) + 7) // 8
            best = min(best or (size, m, n), (size, m, n))
    if best is None:
        return None
    _, m, n = best
    groups = stored.reshape(-1, m)                                            # (G, m)
    # the n positions of each group: its stored entries first, then its earliest fill entries
    first = torch.sort((~groups).to(torch.int8), dim=1, stable=True).indices[:, :n]
    pattern = (torch.ones_like(first) << first).sum(1)                        # (G,) n bits set
    table, rank_of = _combinations(m, n)
    ranks = rank_of[pattern]
    kept = _as_bits(flat).reshape(-1, m).gather(1, table[ranks]).reshape(-1).view(flat.dtype)
    parts, meta = _values_parts(kept, fill)
    parts["ranks"] = pack_bits(ranks, _rank_bits(m, n), 0)
    return parts, {**meta, "n": n, "m": m}


def _nm_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    n, m = meta.get("n"), meta.get("m")
    total = _numel(shape)
    if m not in NM_GROUPS or not isinstance(n, int) or not 0 <= n < m or total % m:
        raise ValueError(f"nm needs meta m in {NM_GROUPS} dividing {total} elements and 0 <= n < m, "
                         f"got n={n!r}, m={m!r}")
    groups = total // m
    table, _ = _combinations(m, n)
    ranks = unpack_bits(parts["ranks"], groups, _rank_bits(m, n), 0, torch.int64)
    if groups and int(ranks.max()) >= table.shape[0]:
        raise ValueError(f"nm rank {int(ranks.max())} is out of range for {n}:{m} ({table.shape[0]} combinations)")
    values = _read_values(parts, meta, groups * n, dtype, f"{groups} groups of {n}:{m} need")
    out = _as_bits(_filled(parts, shape, dtype)).reshape(groups, m)
    out.scatter_(1, table[ranks], _as_bits(values).reshape(groups, n))
    return out.reshape(shape).view(dtype)


register_encoding(Encoding("nm", _nm_encode, _nm_decode, since=4, sparse=True))
