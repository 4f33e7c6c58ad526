"""Entropy-coded encodings (``ans``, ``relative-index-ans``): exact round trips, picked only when
smaller, and a clear error without the optional package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchslim
from torchslim import entropy
from torchslim.encodings import ENCODINGS, decode_tensor, encode_tensor
from torchslim.methods.quantize.kmeans import KMeansQuantConfig


def _nbytes(parts):
    return sum(t.numel() * t.element_size() for t in parts.values())


def _skewed_codes(n: int, seed: int = 0) -> torch.Tensor:
    """int8 codes with a peaked (geometric-like) distribution: entropy about 2.5 bits."""
    g = np.random.default_rng(seed)
    return torch.from_numpy(np.clip(g.geometric(0.35, size=n) - 1, 0, 15).astype(np.int8)) - 4


def test_ans_codes_near_the_entropy_and_round_trips_exactly():
    t = _skewed_codes(20000).reshape(100, 200)
    name, parts, meta = encode_tensor(t)
    assert name == "ans"
    back = decode_tensor(name, parts, meta, tuple(t.shape), t.dtype)
    assert torch.equal(back, t) and back.dtype == torch.int8
    counts = np.bincount((t.reshape(-1).long() + 4).numpy())
    p = counts[counts > 0] / t.numel()
    entropy_bytes = float(-(p * np.log2(p)).sum()) * t.numel() / 8
    packed = _nbytes(ENCODINGS["packed"].encode(t)[0])              # 4 bits a code
    assert _nbytes(parts) < 1.02 * entropy_bytes + 64 < packed, (_nbytes(parts), entropy_bytes, packed)


def test_uniform_codes_keep_the_smaller_plain_encoding():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-128, 128, (64, 64), generator=g, dtype=torch.int8)   # 8 bits of entropy a code
    name, parts, _ = encode_tensor(t)
    assert name == "dense" and _nbytes(parts) == t.numel()


def test_relative_index_ans_on_sparse_codes():
    """Pruned like LeNet-300-100's fc1: inputs at the image border are dead in every row (runs of
    zeros in storage order), the rest mostly pruned; gaps coded by their frequencies beat a
    per-element code, which pays for every zero."""
    g = torch.Generator().manual_seed(1)
    t = _skewed_codes(300 * 784, seed=1).reshape(300, 784) + 5       # codes 1..
    t[torch.rand(t.shape, generator=g) < 0.88] = 0
    t[:, :180] = 0
    t[:, 600:] = 0
    name, parts, meta = encode_tensor(t)
    assert name == "relative-index-ans"
    assert _nbytes(parts) < _nbytes(ENCODINGS["ans"].encode(t)[0])
    assert torch.equal(decode_tensor(name, parts, meta, tuple(t.shape), t.dtype), t)
    plain = _nbytes(ENCODINGS["relative-index"].encode(t)[0])
    assert _nbytes(parts) < 0.85 * plain, (_nbytes(parts), plain)


def test_without_constriction_the_writer_skips_and_the_reader_says_what_to_install(monkeypatch, tmp_path):
    t = _skewed_codes(4096).reshape(64, 64)
    name, parts, meta = encode_tensor(t)
    assert name == "ans"
    monkeypatch.setattr(entropy, "_constriction", lambda: None)
    assert encode_tensor(t)[0] in ("packed", "bitmask")               # skipped, not an error
    with pytest.raises(ValueError, match=r"pip install 'torchslim\[entropy\]'"):
        decode_tensor(name, parts, meta, tuple(t.shape), t.dtype)


def test_pruned_kmeans_model_is_entropy_coded_and_reloads(tmp_path):
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    with torch.no_grad():
        for i in (1, 3):
            w = model[i].weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0.0
    q = torchslim.apply(model, KMeansQuantConfig(bits=5)).eval()
    n = torchslim.save(q, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert {manifest["tensors"][f"{i}.weight_q"]["encoding"] for i in (1, 3)} <= {"ans", "relative-index-ans"}
    assert manifest["format_version"] == 5
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "q")(x), q(x), rtol=0, atol=0)
    # 10% kept at 5 bits + their gaps: under 11 bits a kept weight, all files included
    assert n * 8 / (0.1 * 266200) < 11, n
