"""Entropy-coded storage encodings: integer codes (quantized weights, k-means indices, sparse
gaps) compressed with rANS by the ``constriction`` package (Bamler 2022), the optional
``entropy`` extra (``pip install 'torchslim[entropy]'``).

Two encodings register in :mod:`torchslim.encodings`' table, and the artifact writer keeps one
only when it is the smallest for a tensor, like every encoding:

- ``ans``: every element of an integer tensor (minus its row's most frequent code) whose
  values span at most 256 codes;
- ``relative-index-ans``: the ``relative-index`` coding of a sparse integer tensor (Deep
  Compression's gaps between stored entries, 4 or 8 bits, padding entries for long runs) with
  its gaps and its values each entropy-coded (Han et al. 2016, sec. 4 use Huffman codes for
  the same two streams; ANS comes within a fraction of a bit of the entropy).

A stream is stored as one uint8 part: the symbol counts (bit-packed; the probability model is
rebuilt from them exactly) then the ANS words. Encoding decodes what it wrote and gives up on
the tensor unless it is bit-identical. Without ``constriction`` the writer skips these
encodings and reading an artifact that uses one raises a ValueError saying what to install.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .encodings import (_INT_DTYPES, Encoding, _filled, _nbytes, _numel, _row_fill, check_part, pack_bits, register_encoding,
                        relative_gaps, relative_split, unpack_bits)

#: the largest alphabet (distinct code values) a stream is entropy-coded with
MAX_SYMBOLS = 256
#: the artifact format version that introduced these encodings
SINCE = 5


def _constriction() -> Any | None:
    try:
        import constriction
    except ImportError:
        return None
    return constriction


def _require() -> Any:
    lib = _constriction()
    if lib is None:
        raise ValueError("this tensor is entropy-coded (ANS) and reading it needs the constriction package: "
                         "pip install 'torchslim[entropy]'")
    return lib


def _model(lib: Any, counts: np.ndarray) -> Any:
    """The categorical model of the symbol ``counts`` (the same floats on both sides, so the
    coder's fixed-point model is the same)."""
    return lib.stream.model.Categorical(counts.astype(np.float64) / counts.sum(), perfect=False)


def encode_stream(symbols: np.ndarray, k: int) -> tuple[torch.Tensor, dict[str, int]]:
    """ANS-code ``symbols`` (int64 in ``[0, k)``) into one uint8 tensor: the ``k`` counts packed
    at ``count_bits`` bits each (32 when a count needs more than 16), then the coder's 32-bit
    words (none when a single symbol occurs). Returns ``(part, meta)``, meta ``{"k",
    "count_bits", "words"}``."""
    lib = _require()
    counts = np.bincount(symbols, minlength=k)
    count_bits = max(int(counts.max()).bit_length(), 1)
    if count_bits <= 16:
        head = pack_bits(torch.from_numpy(counts), count_bits, 0).numpy()
    else:
        count_bits, head = 32, counts.astype("<u4").view(np.uint8)
    if (counts > 0).sum() > 1:       # a single symbol needs no words: its count says it all
        coder = lib.stream.stack.AnsCoder()
        coder.encode_reverse(symbols.astype(np.int32), _model(lib, counts))
        words = coder.get_compressed().astype("<u4")
    else:
        words = np.zeros(0, dtype="<u4")
    part = np.concatenate([head, words.view(np.uint8)])
    return torch.from_numpy(part.copy()), {"k": k, "count_bits": count_bits, "words": int(words.size)}


def decode_stream(part: torch.Tensor, meta: dict[str, Any], n: int) -> np.ndarray:
    """Inverse of :func:`encode_stream`: ``n`` symbols (int64); ValueError when the part does
    not hold what ``meta`` says."""
    k, count_bits, words = meta.get("k"), meta.get("count_bits"), meta.get("words")
    if not (isinstance(k, int) and 1 <= k <= MAX_SYMBOLS and count_bits in (*range(1, 17), 32)
            and isinstance(words, int) and words >= 0):
        raise ValueError(f"an ANS stream needs meta k in 1..{MAX_SYMBOLS}, count_bits and words, got {meta!r}")
    head = (k * count_bits + 7) // 8
    raw = check_part({"data": part}, "data", torch.uint8, head + 4 * words).numpy()
    if count_bits == 32:
        counts = raw[:head].copy().view("<u4").astype(np.int64)
    else:
        counts = unpack_bits(torch.from_numpy(raw[:head].copy()), k, count_bits, 0, torch.int64).numpy()
    if int(counts.sum()) != n:
        raise ValueError(f"an ANS stream counts {int(counts.sum())} symbols, {n} expected")
    if (counts > 0).sum() <= 1:
        return np.full(n, int(np.argmax(counts)), dtype=np.int64)
    lib = _require()
    coder = lib.stream.stack.AnsCoder(raw[head:].copy().view("<u4").astype(np.uint32))
    return np.asarray(coder.decode(_model(lib, counts), n), dtype=np.int64)


def _symbols(values: torch.Tensor) -> tuple[np.ndarray, int, int] | None:
    """``(symbols, offset, k)`` of integer ``values`` spanning at most :data:`MAX_SYMBOLS` codes."""
    if values.dtype not in _INT_DTYPES:
        return None
    if values.numel() == 0:
        return np.zeros(0, dtype=np.int64), 0, 1
    lo, hi = int(values.min()), int(values.max())
    if hi - lo + 1 > MAX_SYMBOLS:
        return None
    return (values.reshape(-1).to(torch.int64) - lo).numpy(), lo, hi - lo + 1


def _checked(encode):
    """Wrap an encoder so that it gives up (None) without constriction, and unless its output
    decodes to exactly the input."""
    def wrapped(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if _constriction() is None or t.dtype not in _INT_DTYPES or t.numel() < 64:
            return None
        out = encode(t)
        if out is None:
            return None
        back = ENCODERS[encode](out[0], out[1], tuple(t.shape), t.dtype)
        return out if torch.equal(back, t) else None
    return wrapped


# -- ans: every element --------------------------------------------------------------------
def _ans_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The elements, or each minus its row's fill (the most frequent code of the row,
    :func:`_row_fill`: an affine-quantized pruned row's zero point, so that such a row costs
    what a symmetric one does), whichever codes smaller."""
    row_fill = _row_fill(t)
    best = None
    for fill in (None,) if row_fill is None else (None, row_fill):
        v = t.to(torch.int64)
        if fill is not None:
            v = (v.reshape(t.shape[0], -1) - fill.to(torch.int64)[:, None]).reshape(t.shape)
        found = _symbols(v)
        if found is None:
            continue
        symbols, offset, k = found
        part, meta = encode_stream(symbols, k)
        parts = {"data": part} if fill is None else {"data": part, "fill": fill}
        if best is None or _nbytes(parts) < best[0]:
            best = (_nbytes(parts), parts, {"offset": offset, **meta})
    return None if best is None else best[1:]


def _ans_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _INT_DTYPES or not isinstance(meta.get("offset"), int):
        raise ValueError(f"ans decodes integer dtypes with an integer offset, got {dtype}, {meta.get('offset')!r}")
    out = torch.from_numpy(decode_stream(parts["data"], meta, _numel(shape))) + meta["offset"]
    if "fill" in parts:
        rows = shape[0] if shape else 0
        out = out.reshape(rows, -1) + check_part(parts, "fill", dtype, rows).to(torch.int64)[:, None]
    return out.to(dtype).reshape(shape)


# -- relative-index-ans: Deep Compression's sparse coding, both streams entropy-coded ---------
def _relative_ans_encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    split = relative_split(t)
    if split is None:
        return None
    fill, flat, pos, skips = split
    if pos.numel() > flat.numel() // 2:     # mostly stored entries: ``ans`` codes them in fewer bytes
        return None
    best = None
    for bits in (4, 8):
        gaps, where = relative_gaps(skips, bits)
        found = _symbols(flat[where])                     # padding entries hold the fill
        if found is None:
            return None
        symbols, offset, k = found
        gap_part, gap_meta = encode_stream(gaps.numpy(), 2 ** bits)
        value_part, value_meta = encode_stream(symbols, k)
        size = gap_part.numel() + value_part.numel()
        if best is None or size < best[0]:
            best = (size, {"gaps": gap_part, "values": value_part},
                    {"index_bits": bits, "entries": int(gaps.numel()), "offset": offset, "gaps": gap_meta,
                     "values": value_meta})
    _, parts, meta = best
    if fill is not None:
        parts["fill"] = fill
    return parts, meta


def _relative_ans_decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...],
                         dtype: torch.dtype) -> torch.Tensor:
    bits, count, offset = meta.get("index_bits"), meta.get("entries"), meta.get("offset")
    if (bits not in (4, 8) or not isinstance(count, int) or count < 0 or not isinstance(offset, int)
            or not isinstance(meta.get("gaps"), dict) or not isinstance(meta.get("values"), dict)):
        raise ValueError("relative-index-ans needs meta index_bits 4 or 8, entries >= 0, an integer offset and "
                         f"the gaps and values streams, got {meta!r}")
    if dtype not in _INT_DTYPES:
        raise ValueError(f"relative-index-ans decodes integer dtypes only, the manifest says {dtype}")
    n = _numel(shape)
    gaps = torch.from_numpy(decode_stream(parts["gaps"], meta["gaps"], count))
    values = torch.from_numpy(decode_stream(parts["values"], meta["values"], count)) + offset
    pos = (gaps + 1).cumsum(0) - 1                                            # (count,) ascending
    if count and int(pos[-1]) >= n:
        raise ValueError(f"relative-index-ans gaps reach position {int(pos[-1])} of a tensor of {n} elements")
    out = _filled(parts, shape, dtype)
    out[pos] = values.to(dtype)
    return out.reshape(shape)


ENCODERS = {_ans_encode: _ans_decode, _relative_ans_encode: _relative_ans_decode}
register_encoding(Encoding("ans", _checked(_ans_encode), _ans_decode, since=SINCE))
register_encoding(Encoding("relative-index-ans", _checked(_relative_ans_encode), _relative_ans_decode,
                           since=SINCE, sparse=True))
