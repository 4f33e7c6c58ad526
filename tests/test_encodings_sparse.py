"""Sparse storage encodings: relative-index (Deep Compression), nm (N:M) and the writer's choice."""

from __future__ import annotations

import math

import pytest
import torch

from torchslim.encodings import ENCODINGS, decode_tensor, encode_tensor, stored_nonzeros
from torchslim.methods.prune.primitives import nm_mask

SPARSE = ("bitmask", "relative-index", "nm")


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.float16: torch.int16}.get(a.dtype)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view) if view else a,
                                                                     b.view(view) if view else b)


def _sparse_tensor(shape, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 50).to(dtype)
    drop = torch.randperm(t.numel(), generator=g)[: round(sparsity * t.numel())]
    t.view(-1)[drop] = 0
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("shape", [(64,), (37, 19), (8, 3, 5, 5), (300, 784)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98, 1.0])
def test_sparse_encodings_round_trip_exactly_and_the_writer_takes_the_smallest(sparsity, shape, dtype):
    t = _sparse_tensor(shape, sparsity, dtype, seed=len(shape))
    if dtype.is_floating_point:
        t.view(-1)[1::7] = -0.0                                       # kept as -0.0, not turned into +0.0
    sizes = {}
    for name in ENCODINGS:                                          # every registered encoding
        out = ENCODINGS[name].encode(t)
        if out is None:
            continue
        parts, meta = out
        assert _same_bits(decode_tensor(name, parts, meta, tuple(t.shape), t.dtype), t), name
        sizes[name] = _nbytes(parts)
    name, parts, meta = encode_tensor(t)
    assert _nbytes(parts) == min(sizes.values()) and name in sizes
    assert _same_bits(decode_tensor(name, parts, meta, tuple(t.shape), t.dtype), t)


def test_relative_index_gaps_and_padding_zeros_as_in_deep_compression():
    """Han et al. 2016, sec. 2: a gap over 15 (4-bit) gets a padding zero 16 positions on."""
    t = torch.zeros(128)
    t[20], t[24] = 1.5, -2.0
    t[64::2] = 3.0
    parts, meta = ENCODINGS["relative-index"].encode(t)
    # zeros skipped: 20 -> padding (15) + 4; 3; 39 -> two paddings (15, 15) + 7; then 1 before each
    gaps = [15, 4, 3, 15, 15, 7] + [1] * 31
    assert meta == {"index_bits": 4, "entries": 37}            # 4-bit: 37 * 4.5 bytes; 8-bit: 34 * 5
    assert parts["gaps"].tolist() == [g0 | g1 << 4 for g0, g1 in zip(gaps[::2], gaps[1::2] + [0])]
    assert parts["values"].tolist() == [0.0, 1.5, -2.0, 0.0, 0.0] + [3.0] * 32
    assert torch.equal(decode_tensor("relative-index", parts, meta, (128,), torch.float32), t)


def test_relative_index_takes_8_bit_gaps_when_non_zeros_are_far_apart():
    t = torch.zeros(10_000)
    t[::100] = 1.0                                                    # 99 zeros before each
    parts, meta = ENCODINGS["relative-index"].encode(t)
    # 8-bit: one entry per non-zero (5 bytes); 4-bit would need 6 padding entries each (31.5 bytes)
    assert meta == {"index_bits": 8, "entries": 100} and _nbytes(parts) == 100 * 5
    assert torch.equal(decode_tensor("relative-index", parts, meta, (10_000,), torch.float32), t)
    name, parts, _ = encode_tensor(t)
    assert name == "relative-index" and _nbytes(parts) < _nbytes(ENCODINGS["bitmask"].encode(t)[0]) / 2


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_nm_stores_n_values_and_a_rank_of_log2_binomial_bits_per_group(n, m):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(m))
    w = w.masked_fill(~nm_mask(w.abs(), n, m), 0.0)
    w[0, :m] = 0.0                                                    # a group with fewer than n non-zeros
    parts, meta = ENCODINGS["nm"].encode(w)
    groups = w.numel() // meta["m"]
    assert (meta["n"], meta["m"]) in {(n, m), (n * 16 // m, 16), (n * 8 // m, 8)}    # the smallest grouping
    best = min(((n * k // m, k) for k in (4, 8, 16) if k >= m),
               key=lambda nk: w.numel() // nk[1] * nk[0] * 4 + math.ceil(
                   w.numel() // nk[1] * (math.comb(nk[1], nk[0]) - 1).bit_length() / 8))
    assert (meta["n"], meta["m"]) == best
    assert parts["values"].numel() == groups * meta["n"]
    assert parts["ranks"].numel() == math.ceil(groups * (math.comb(meta["m"], meta["n"]) - 1).bit_length() / 8)
    assert torch.equal(decode_tensor("nm", parts, meta, tuple(w.shape), w.dtype), w)
    bitmask = _nbytes(ENCODINGS["bitmask"].encode(w)[0])
    assert _nbytes(parts) < bitmask and encode_tensor(w)[0] == "nm"


def test_all_zero_and_dense_tensors():
    zeros = torch.zeros(16, 16)
    name, parts, meta = encode_tensor(zeros)
    assert _nbytes(parts) == 0 and torch.equal(decode_tensor(name, parts, meta, (16, 16), torch.float32), zeros)
    full = torch.arange(1.0, 257.0).reshape(16, 16)
    assert encode_tensor(full)[0] == "dense" and stored_nonzeros(full) == 256
    assert ENCODINGS["nm"].encode(full) is None                       # no group has a zero


@pytest.mark.parametrize("change,error", [
    ({"index_bits": 5}, "index_bits 4 or 8"),
    ({"entries": 40}, "cannot hold"),
    ({}, "reach position 126"),
])
def test_bad_relative_index_parts_are_refused(change, error):
    t = torch.zeros(128)
    t[20], t[24] = 1.5, -2.0
    t[64::2] = 3.0
    parts, meta = ENCODINGS["relative-index"].encode(t)
    shape = (100,) if not change else (128,)                          # unchanged parts, shorter tensor
    with pytest.raises(ValueError, match=error):
        decode_tensor("relative-index", parts, {**meta, **change}, shape, torch.float32)


@pytest.mark.parametrize("pattern", ["90%", "2:4"])
def test_pruned_affine_codes_keep_their_row_fill_and_packed_values(pattern):
    """Affine-quantized pruned weights: pruned codes equal their row's zero point (the fill), and
    4-bit codes are bit-packed as values, in every sparse encoding as in the bitmask."""
    g = torch.Generator().manual_seed(0)
    zero = torch.randint(-8, 8, (48, 1), generator=g)
    codes = torch.randint(-8, 8, (48, 128), generator=g)
    keep = nm_mask(torch.rand(48, 128, generator=g), 2, 4) if pattern == "2:4" else torch.rand(48, 128, generator=g) < 0.1
    t = torch.where(keep, codes, zero).to(torch.int8)
    assert stored_nonzeros(t) == int((t != zero.to(torch.int8)).sum())
    sizes = {}
    for name in SPARSE:
        parts, meta = ENCODINGS[name].encode(t)
        assert parts["fill"].tolist() == zero.reshape(-1).tolist() and meta["bits"] == 4, name
        assert torch.equal(decode_tensor(name, parts, meta, tuple(t.shape), t.dtype), t), name
        sizes[name] = _nbytes(parts)
    assert encode_tensor(t)[0] == ("nm" if pattern == "2:4" else "relative-index")
    assert min(sizes.values()) < sizes["bitmask"]


def test_nm_keeps_bfloat16_nan_payloads():
    """Regression (hypothesis, test_artifact): CPU gather of bfloat16 turned NaN 0x7FC0 into 0xFFFF,
    so the nm encoding was not bit-exact; it now moves bit patterns."""
    bits = torch.zeros(64, dtype=torch.int16)
    bits[3::12] = 0x7FC0
    bits[5::12] = -0x8000                                     # -0.0
    t = bits.view(torch.bfloat16).reshape(4, 16)
    parts, meta = ENCODINGS["nm"].encode(t)
    back = decode_tensor("nm", parts, meta, (4, 16), torch.bfloat16)
    assert torch.equal(back.view(torch.int16), bits.reshape(4, 16))
