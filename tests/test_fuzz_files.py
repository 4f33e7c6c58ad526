"""Fuzzing the readers of files from disk: any mutated artifact manifest, tensors file or
weights file gives a model or a clean UserError (exit 2), never another exception, a hang or a
large allocation. A bounded run here; ``bench/fuzz_files.py`` runs the same properties longer."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchslim
from torchslim.errors import UserError
from torchslim.weights import read_state_dict

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
              st.text(max_size=12), st.sampled_from(["weight", "float32", "int8", "bitmask", "dense",
                                                     "tensors.safetensors", "zoo:digits-cnn", "module"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


#: examples per property: a bounded run in the suite, a long one from bench/fuzz_files.py
SCALE = float(os.environ.get("TORCHSLIM_FUZZ_SCALE", "1"))


def _n(base: int) -> int:
    return max(1, int(base * SCALE))


def _mutate(manifest: dict, which: int, value, delete: bool) -> dict:
    out = copy.deepcopy(manifest)
    paths = [p for p in _paths(out) if p]
    path = paths[which % len(paths)]
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    from torchslim.methods.quantize.linear import LinearQuantConfig

    model = torchslim.apply(model, LinearQuantConfig(bits=4, targets=("6",)))   # a packed layer too
    path = tmp_path_factory.mktemp("fuzz") / "a"
    torchslim.save(model, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _load_or_clean_error(path: Path) -> None:
    try:
        torchslim.load(path)
    except UserError:
        pass


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@settings(max_examples=_n(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10_000), value=json_values, delete=st.booleans())
def test_mutated_manifest_loads_or_is_refused(artifact, tmp_path, which, value, delete):
    manifest = json.loads((artifact / "manifest.json").read_text())
    path = _copy(artifact, tmp_path / f"m{which}")
    (path / "manifest.json").write_text(json.dumps(_mutate(manifest, which, value, delete)))
    before = _peak_rss_mib()
    _load_or_clean_error(path)
    assert _peak_rss_mib() - before < 512


@settings(max_examples=_n(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets=st.lists(st.integers(0, 2**31), min_size=1, max_size=8), byte=st.integers(0, 255),
       truncate=st.booleans())
def test_mutated_tensors_file_with_a_matching_checksum_loads_or_is_refused(artifact, tmp_path, offsets, byte,
                                                                            truncate):
    """The checksum is recomputed after the mutation, so the safetensors reader and the tensor
    checks are what must refuse it (a header byte, a code, a scale, a cut file)."""
    path = _copy(artifact, tmp_path / f"t{offsets[0]}")
    f = path / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    for off in offsets:
        data[off % len(data)] = byte
    if truncate:
        data = data[: offsets[0] % len(data)]
    f.write_bytes(bytes(data))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = {"sha256": hashlib.sha256(bytes(data)).hexdigest(),
                                                "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    _load_or_clean_error(path)


@settings(max_examples=_n(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["safetensors", "torch"]), offsets=st.lists(st.integers(0, 2**31), max_size=6),
       byte=st.integers(0, 255), cut=st.integers(0, 2**31), raw=st.binary(max_size=64))
def test_mutated_weights_file_reads_or_is_refused(tmp_path, kind, offsets, byte, cut, raw):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(3)}
    f = tmp_path / f"w.{'safetensors' if kind == 'safetensors' else 'pt'}"
    if kind == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(f))
    else:
        torch.save(state, f)
    data = bytearray(f.read_bytes())
    for off in offsets:
        data[off % len(data)] = byte
    data = data[: max(cut % (len(data) + 1), 1)] + raw if cut % 3 == 0 else data
    f.write_bytes(bytes(data))
    before = _peak_rss_mib()
    try:
        got = read_state_dict(f)
        assert all(isinstance(v, torch.Tensor) for v in got.values())
    except UserError:
        pass
    assert _peak_rss_mib() - before < 512


def test_a_huge_manifest_is_refused_unread(artifact, tmp_path):
    path = _copy(artifact, tmp_path / "huge")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["padding"] = "x" * (33 << 20)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="a manifest is at most"):
        torchslim.load(path)


def test_a_zip_bomb_weights_file_is_refused_before_inflating(tmp_path):
    import zipfile

    torch.save({"w": torch.zeros(4)}, tmp_path / "small.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "small.pt") as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename:                       # the tensor's bytes: 64 MiB of zeros
                dst.writestr(info.filename, bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match=r"refused: its zip members unpack to 67,10\d,\d+ bytes"):
        read_state_dict(bomb)                                   # checked before torch.load reads it
