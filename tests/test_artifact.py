"""Artifact storage: encodings round-trip exactly, writes are atomic, loading checks everything."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchslim
from torchslim.encodings import ENCODINGS, decode_tensor, encode_tensor
from torchslim.errors import ArtifactError


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8]))
def test_every_encoding_round_trips_exactly(shape, density, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        t = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    else:
        t = torch.randn(shape, generator=g).to(dtype)
    t = t * (torch.rand(shape, generator=g) < density).to(t.dtype)
    for enc in ENCODINGS.values():
        out = enc.encode(t)
        if out is None:
            continue
        parts, meta = out
        back = decode_tensor(enc.name, parts, meta, tuple(t.shape), t.dtype)
        assert back.dtype == t.dtype and torch.equal(back, t), enc.name


def test_smallest_encoding_is_chosen():
    t = torch.zeros(1000)
    t[::10] = 1.0
    name, parts, _ = encode_tensor(t)
    assert name == "bitmask"
    assert sum(p.numel() * p.element_size() for p in parts.values()) == 125 + 100 * 4
    name, _, _ = encode_tensor(torch.randn(1000))
    assert name == "dense"


def test_save_is_atomic_and_keeps_the_old_artifact_on_failure(tmp_path, monkeypatch):
    m = torchslim.build_model("zoo:lenet-300-100")
    torchslim.save(m, tmp_path / "art")
    before = (tmp_path / "art" / "manifest.json").read_text()

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        torchslim.save(torchslim.build_model("zoo:lenet-300-100"), tmp_path / "art")
    assert (tmp_path / "art" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "temporary directory left behind"


def test_manifest_describes_every_tensor(tmp_path):
    m = torchslim.build_model("zoo:lenet-5")
    torchslim.save(m, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["source"]["spec"] == "zoo:lenet-5"
    assert set(manifest["tensors"]) == set(m.state_dict())
    assert len(manifest["files"]["tensors.safetensors"]["sha256"]) == 64


def test_load_checks_shapes(tmp_path):
    m = torchslim.build_model("zoo:digits-cnn", args={"hidden": 64})
    torchslim.save(m, tmp_path / "a")
    mf = tmp_path / "a" / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["source"]["args"] = {"hidden": 32}          # architecture no longer matches the tensors
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="shape"):
        torchslim.load(tmp_path / "a")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        torchslim.load(tmp_path)


def test_torchvision_model_round_trip(tmp_path):
    torch.manual_seed(0)
    m = torchslim.build_model("torchvision:resnet18", args={"num_classes": 10}).eval()
    torchslim.save(m, tmp_path / "r")
    back = torchslim.load(tmp_path / "r")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_safetensors_and_state_dict_weights_load(tmp_path):
    from safetensors.torch import save_file
    src = torchslim.build_model("zoo:lenet-300-100")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        m = torchslim.build_model("zoo:lenet-300-100", weights=tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
