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


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t``: -0.0 differs from +0.0 and NaN payloads count."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), specials=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16,
                              torch.int8, torch.uint8, torch.int16, torch.int32]))
def test_every_encoding_round_trips_exactly(shape, density, seed, specials, dtype):
    """Bit-exact, not just ==: regression for the bitmask encoding turning -0.0 into +0.0."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    t = t * (torch.rand(shape, generator=g) < density).to(t.dtype)  # negative * 0 gives -0.0
    if specials and dtype.is_floating_point:
        flat = t.view(-1)
        flat[:: 3] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")],
                                  dtype=dtype).repeat(flat.numel())[: flat[:: 3].numel()]
    for enc in ENCODINGS.values():
        out = enc.encode(t)
        if out is None:
            continue
        parts, meta = out
        back = decode_tensor(enc.name, parts, meta, tuple(t.shape), t.dtype)
        assert back.dtype == t.dtype and back.shape == t.shape, enc.name
        assert torch.equal(_bits(back), _bits(t)), enc.name


def test_bitmask_keeps_negative_zero():
    """Regression: the bitmask encoding stored -0.0 as a zero bit and decoded it as +0.0."""
    t = torch.zeros(128)
    t[::4] = -0.0
    t[1] = 2.5
    parts, meta = ENCODINGS["bitmask"].encode(t)
    back = decode_tensor("bitmask", parts, meta, (128,), torch.float32)
    assert torch.equal(torch.signbit(back), torch.signbit(t))
    assert torch.equal(_bits(back), _bits(t))


def test_smallest_encoding_is_chosen():
    t = torch.zeros(1000)
    t[::10] = 1.0
    name, parts, _ = encode_tensor(t)
    # gaps of 9 zeros: 4-bit relative indices (100 * 4 bits) beat the bitmask's 1000 bits
    assert name == "relative-index"
    assert sum(p.numel() * p.element_size() for p in parts.values()) == 50 + 100 * 4
    t[::2] = 2.0                    # 55% non-zero, one in every pair: 1:2 sparse
    name, parts, _ = encode_tensor(t)
    assert name == "nm"             # 500 values + a 1-bit rank per pair
    assert sum(p.numel() * p.element_size() for p in parts.values()) == 500 * 4 + 500 // 8 + 1
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    t[t.abs() < 0.5] = 0.0          # 62% non-zero at random places: the bitmask wins
    nonzero = int((t != 0).sum())
    name, parts, _ = encode_tensor(t)
    assert name == "bitmask"
    assert sum(p.numel() * p.element_size() for p in parts.values()) == 125 + nonzero * 4
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
    assert manifest["format_version"] == 3 and manifest["edits"] == []
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


# -- regressions from review: the manifest is checked whole before any of it is used ----------
def _saved_digits(tmp_path):
    m = torchslim.build_model("zoo:digits-cnn")
    torchslim.save(m, tmp_path / "a")
    return tmp_path / "a", json.loads((tmp_path / "a" / "manifest.json").read_text())


def _rewrite(path, manifest):
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_a_weight_byte(path):
    f = path / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("files", ["delete", [], {}, {"other.bin": {"sha256": "0" * 64, "bytes": 0}}])
def test_checksums_cannot_be_bypassed_through_files_key(tmp_path, files):
    """Regression: deleting "files" (or making it a list) made load() accept modified tensors."""
    path, manifest = _saved_digits(tmp_path)
    _flip_a_weight_byte(path)
    if files == "delete":
        del manifest["files"]
    else:
        manifest["files"] = files
    _rewrite(path, manifest)
    with pytest.raises(ArtifactError, match='"files"'):
        torchslim.load(path)


def _set(keypath, value):
    """An edit of the manifest at a path of keys; ``...`` as value deletes the key."""
    def edit(manifest):
        *parents, last = keypath
        d = manifest
        for k in parents:
            d = d[k] if not callable(k) else k(d)
        if value is ...:
            del d[last]
        else:
            d[last] = value
    return edit


def _first(d):
    return d[next(iter(d))]


BAD_MANIFESTS = {
    "files as list": (_set(["files"], ["tensors.safetensors"]), '"files" must be a mapping'),
    "files entry not a mapping": (_set(["files", "tensors.safetensors"], "abc"), '"files"'),
    "files path outside": (_set(["files", "../x"], {"sha256": "0" * 64, "bytes": 1}), "plain file name"),
    "sha256 not hex": (_set(["files", "tensors.safetensors", "sha256"], 5), "sha256"),
    "source missing": (_set(["source"], ...), '"source" must be a mapping'),
    "source a string": (_set(["source"], "zoo:digits-cnn"), '"source" must be a mapping'),
    "source spec missing": (_set(["source", "spec"], ...), '"source".spec'),
    "source args a list": (_set(["source", "args"], [1]), '"source".args'),
    "source is another artifact": (_set(["source", "spec"], "artifact:."), "not another artifact"),
    "source args break the builder": (_set(["source", "args"], {"hidden": -5}), "cannot rebuild the architecture"),
    "source args unknown": (_set(["source", "args"], {"bogus": 1}), "cannot rebuild the architecture"),
    "source spec unknown": (_set(["source", "spec"], "nope:x"), "cannot rebuild the architecture"),
    "tensors missing": (_set(["tensors"], ...), '"tensors" must be a mapping'),
    "tensors a list": (_set(["tensors"], []), '"tensors" must be a mapping'),
    "tensor record a list": (_set(["tensors", "0.weight"], []), "'0.weight'"),
    "edits a mapping": (_set(["edits"], {}), '"edits" must be a list'),
    "edit record a string": (_set(["edits"], ["x"]), '"edits"[0] must be a mapping'),
    "edit op unknown": (_set(["edits"], [{"op": "explode", "target": "9"}]), "unknown op 'explode'"),
    "edit without target": (_set(["edits"], [{"op": "delete"}]), "needs a string 'target'"),
    "edit args a list": (_set(["edits"], [{"op": "module", "target": "9", "class": "torch.nn.Linear",
                                           "args": []}]), "needs 'args' of type dict"),
    "module with unknown args": (_set(["edits"], [{"op": "module", "target": "9", "class": "torch.nn.Linear",
                                                   "args": {"in_features": 128, "out_features": 10, "bogus": 1}}]),
                                 "cannot replay edit 0 (module '9')"),
    "module with negative args": (_set(["edits"], [{"op": "module", "target": "9", "class": "torch.nn.Linear",
                                                    "args": {"in_features": 128, "out_features": -1}}]),
                                  "cannot replay edit 0 (module '9')"),
    "module not in the model": (_set(["edits"], [{"op": "module", "target": "nope", "class": "torch.nn.Identity",
                                                  "args": {}}]), "has no child module 'nope'"),
    "module class unknown": (_set(["edits"], [{"op": "module", "target": "9", "class": "evil.Module",
                                               "args": {}}]), "does not know"),
    "setattr on a missing attribute": (_set(["edits"], [{"op": "setattr", "target": "", "attr": "nope.x",
                                                         "value": 1}]), "cannot replay edit 0 (setattr"),
    "tensor shape negative": (_set(["edits"], [{"op": "tensor", "target": "0.weight", "shape": [-1]}]),
                              "non-negative"),
    "v2 modules a list": (lambda m: (_set(["format_version"], 2)(m), _set(["modules"], [])(m)),
                          '"modules" must be a mapping'),
    "dtype load": (_set(["tensors", "0.weight", "dtype"], "load"), "dtype must be one of"),
    "dtype missing": (_set(["tensors", "0.weight", "dtype"], ...), "dtype must be one of"),
    "shape abc": (_set(["tensors", "0.weight", "shape"], "abc"), "shape must be a list"),
    "shape negative": (_set(["tensors", "0.weight", "shape"], [-1, 1, 3, 3]), "shape must be a list"),
    "shape huge": (_set(["tensors", "0.weight", "shape"], [2**61, 2**61]), "impossible"),
    "shape wrong": (_set(["tensors", "0.weight", "shape"], [1, 1, 3, 3]), "has shape"),
    "encoding unknown": (_set(["tensors", "0.weight", "encoding"], "zip"), "encoding must be one of"),
    "parts a list": (_set(["tensors", "0.weight", "parts"], []), "parts must be a mapping"),
    "part missing in file": (_set(["tensors", "0.weight", "parts", "data"], "nope"), "not in tensors.safetensors"),
    "part name wrong": (_set(["tensors", "0.weight", "parts"], {"values": "0.weight::data"}), "needs part"),
    "format_version a string": (_set(["format_version"], "1"), "format_version"),
    "aliases a list": (_set(["aliases"], []), '"aliases" must be a mapping'),
    "alias to nothing": (_set(["aliases", "x.weight"], "nope"), "name of a stored tensor"),
    "alias shadows a tensor": (_set(["aliases", "0.bias"], "0.weight"), "not also stored"),
    "preprocessing a string": (_set(["preprocessing"], "x / 255"), '"preprocessing" must be a mapping or null'),
}


@pytest.mark.parametrize("edit,needle", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_malformed_manifest_is_an_artifact_error(tmp_path, edit, needle):
    """Regression: each of these escaped as TypeError/KeyError/AttributeError/RecursionError (exit 1)."""
    path, manifest = _saved_digits(tmp_path)
    edit(manifest)
    _rewrite(path, manifest)
    with pytest.raises(ArtifactError) as info:
        torchslim.load(path)
    assert needle in str(info.value)


def test_malformed_manifest_exits_2_on_the_command_line(tmp_path, capsys):
    from torchslim.cli import main
    path, manifest = _saved_digits(tmp_path)
    manifest["tensors"]["0.weight"]["shape"] = "abc"
    _rewrite(path, manifest)
    code = main(["measure", f"artifact:{path}", "--task", "digits", "--batch-sizes", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "shape" in err and "Traceback" not in err


def test_manifest_dtype_edit_is_refused_not_cast(tmp_path):
    """Regression: a manifest dtype changed to float16 silently cast the stored float32 values."""
    path, manifest = _saved_digits(tmp_path)
    manifest["tensors"]["0.weight"]["dtype"] = "float16"
    _rewrite(path, manifest)
    with pytest.raises(ArtifactError, match="stored as float32 but the manifest says float16"):
        torchslim.load(path)


# -- regression: loading a py: artifact ran the Python file its manifest names ---------------
TIED_PY = '''
import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build(tie=True):
    return Tied(tie)
'''


def _py_model(tmp_path, **args):
    f = tmp_path / "tied_model.py"
    f.write_text(TIED_PY)
    torch.manual_seed(0)
    return torchslim.build_model(f"py:{f}:build", args=args).eval(), f


def test_py_artifact_needs_trust_code(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRUST_CODE", raising=False)
    m, f = _py_model(tmp_path)
    torchslim.save(m, tmp_path / "a")
    with pytest.raises(ArtifactError) as info:
        torchslim.load(tmp_path / "a")
    msg = str(info.value)
    assert str(f.resolve()) in msg and "trust_code=True" in msg and "TORCHSLIM_TRUST_CODE=1" in msg
    with pytest.raises(ArtifactError, match="trust_code"):
        torchslim.build_model(f"artifact:{tmp_path / 'a'}")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "a", trust_code=True)(x), m(x), rtol=0, atol=0)
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "a")(x), m(x), rtol=0, atol=0)


def test_tampered_manifest_cannot_run_another_file(tmp_path, monkeypatch):
    """Regression: a manifest whose source points at any Python file imported (ran) it on load."""
    monkeypatch.delenv("TORCHSLIM_TRUST_CODE", raising=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef build():\n    raise SystemExit\n")
    path, manifest = _saved_digits(tmp_path)
    manifest["source"] = {"spec": f"py:{evil}:build", "args": {}, "file": str(evil), "factory": "build"}
    _rewrite(path, manifest)
    with pytest.raises(ArtifactError, match="trust_code=True"):
        torchslim.load(path)
    assert not marker.exists(), "the file named by the manifest was executed"


# -- regression: tied (shared) tensors were stored twice --------------------------------------
def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    tied, _ = _py_model(tmp_path)
    untied, _ = _py_model(tmp_path, tie=False)
    size_tied = torchslim.save(tied, tmp_path / "t")
    size_untied = torchslim.save(untied, tmp_path / "u")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["aliases"] == {"b.weight": "a.weight"}
    assert "b.weight" not in manifest["tensors"] and manifest["format_version"] == 3
    assert size_untied - size_tied >= 32 * 32 * 4 - 200    # one weight matrix less (manifest differs a bit)
    back = torchslim.load(tmp_path / "t", trust_code=True)
    assert back.b.weight is back.a.weight
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tied(x), rtol=0, atol=0)


def test_tie_made_after_building_is_restored(tmp_path):
    m, _ = _py_model(tmp_path, tie=False)
    m.b.weight = m.a.weight                         # the rebuilt architecture will not tie these
    torchslim.save(m, tmp_path / "t")
    back = torchslim.load(tmp_path / "t", trust_code=True)
    assert back.b.weight is back.a.weight
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_format_1_manifest_without_aliases_still_loads(tmp_path):
    """An artifact written before aliases existed: tied tensors stored under both names."""
    m, _ = _py_model(tmp_path)
    torchslim.save(m, tmp_path / "t")
    mf = tmp_path / "t" / "manifest.json"
    manifest = json.loads(mf.read_text())
    for alias, target in manifest.pop("aliases").items():
        manifest["tensors"][alias] = manifest["tensors"][target]
    manifest["format_version"] = 1
    mf.write_text(json.dumps(manifest))
    back = torchslim.load(tmp_path / "t", trust_code=True)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_preprocessing_is_recorded_and_old_artifacts_still_load(tmp_path, digits_task):
    from torchslim.artifact import read_preprocessing

    m = torchslim.build_model("zoo:digits-cnn").eval()
    torchslim.save(m, tmp_path / "a", preprocessing=digits_task.preprocessing)
    assert read_preprocessing(tmp_path / "a") == digits_task.preprocessing
    # an artifact written before the field existed: no key at all
    mf = tmp_path / "a" / "manifest.json"
    manifest = json.loads(mf.read_text())
    del manifest["preprocessing"]
    mf.write_text(json.dumps(manifest))
    assert read_preprocessing(tmp_path / "a") is None
    x = digits_task.example_inputs(3)[0]
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "a")(x), m(x), rtol=0, atol=0)


def test_hf_tied_embeddings_are_stored_once(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    transformers.T5Model(cfg).save_pretrained(tmp_path / "t5")
    m = torchslim.build_model(f"hf:{tmp_path / 't5'}").eval()
    torchslim.save(m, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["aliases"] == {"encoder.embed_tokens.weight": "shared.weight",
                                   "decoder.embed_tokens.weight": "shared.weight"}
    back = torchslim.load(tmp_path / "a")
    assert back.encoder.embed_tokens.weight is back.shared.weight
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, decoder_input_ids=ids).last_hidden_state,
                                   m(input_ids=ids, decoder_input_ids=ids).last_hidden_state, rtol=0, atol=0)
