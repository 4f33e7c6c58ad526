"""The artifact's edit log and honest storage: hand-made architecture edits reload without
pickles, stored dtypes win, sub-byte codes are packed, non-zeros are counted from the layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim
from torchslim.edits import delete_module, edits_of, replace_module, resize_tensor, set_attribute
from torchslim.errors import ArtifactError
from torchslim.measure import count_params
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.methods.quantize.linear import LinearQuantConfig


def _same_outputs(a: nn.Module, b: nn.Module, *inputs, **kw) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(*inputs, **kw), a(*inputs, **kw), rtol=0, atol=0)


def _halve_conv_out(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, len(keep), conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight[keep])
    return new


def test_resnet18_block_with_halved_channels_reloads(tmp_path):
    """Structured-pruning-style hand edit: conv1 of layer1.0 keeps 32 of 64 filters, its BN and
    its consumer conv2 follow; the artifact rebuilds it from torchvision:resnet18 + the log."""
    torch.manual_seed(0)
    m = torchslim.build_model("torchvision:resnet18", args={"num_classes": 10}).eval()
    block = m.layer1[0]
    keep = torch.arange(0, 64, 2)
    replace_module(m, "layer1.0.conv1", _halve_conv_out(block.conv1, keep))
    bn = nn.BatchNorm2d(32)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(block.bn1, name)[keep])
    replace_module(m, "layer1.0.bn1", bn)
    conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
    with torch.no_grad():
        conv2.weight.copy_(block.conv2.weight[:, keep])
    replace_module(m, "layer1.0.conv2", conv2)
    m.eval()
    torchslim.save(m, tmp_path / "r")
    back = torchslim.load(tmp_path / "r")
    assert back.layer1[0].conv1.out_channels == 32 and back.layer1[0].conv2.in_channels == 32
    _same_outputs(m, back, torch.randn(2, 3, 64, 64))
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert [e["target"] for e in manifest["edits"]] == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    try:
        return torchslim.build_model("hf:minilm").eval()
    except Exception as exc:  # the bundled model package is part of .[nlp]
        pytest.skip(f"hf:minilm unavailable: {exc}")


def _ids():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(100, 2000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def test_minilm_with_a_layer_dropped_reloads(tmp_path, minilm):
    import copy
    m = copy.deepcopy(minilm)
    delete_module(m, "encoder.layer.3")
    set_attribute(m, "", "config.num_hidden_layers", 5)
    assert len(m.encoder.layer) == 5
    torchslim.save(m, tmp_path / "m")
    back = torchslim.load(tmp_path / "m")
    assert len(back.encoder.layer) == 5 and back.config.num_hidden_layers == 5
    a, b = m(**_ids()).last_hidden_state, back(**_ids()).last_hidden_state
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    # and it is not the 6-layer model
    assert not torch.allclose(minilm(**_ids()).last_hidden_state, a)


def test_minilm_with_heads_removed_reloads(tmp_path, minilm):
    """Remove head 2 of 12 in layer 0: q/k/v lose its 32 output rows, the output projection
    its 32 input columns, and the attention module's head count follows."""
    import copy
    m = copy.deepcopy(minilm)
    att = m.encoder.layer[0].attention
    hd = att.self.attention_head_size
    heads = att.self.num_attention_heads
    keep = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in range(heads) if h != 2])
    for proj in ("query", "key", "value"):
        old = getattr(att.self, proj)
        new = nn.Linear(old.in_features, len(keep))
        with torch.no_grad():
            new.weight.copy_(old.weight[keep])
            new.bias.copy_(old.bias[keep])
        replace_module(m, f"encoder.layer.0.attention.self.{proj}", new)
    old = att.output.dense
    new = nn.Linear(len(keep), old.out_features)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, keep])
        new.bias.copy_(old.bias)
    replace_module(m, "encoder.layer.0.attention.output.dense", new)
    set_attribute(m, "encoder.layer.0.attention.self", "num_attention_heads", heads - 1)
    set_attribute(m, "encoder.layer.0.attention.self", "all_head_size", len(keep))
    torchslim.save(m, tmp_path / "h")
    back = torchslim.load(tmp_path / "h")
    assert back.encoder.layer[0].attention.self.num_attention_heads == heads - 1
    torch.testing.assert_close(back(**_ids()).last_hidden_state, m(**_ids()).last_hidden_state, rtol=0, atol=0)


def test_resized_bare_parameter_reloads(tmp_path):
    """A bare parameter resized, like a ViT position embedding for another resolution."""
    (tmp_path / "tiny.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.pos_embedding = torch.nn.Parameter(torch.randn(1, 5, 16))\n"
        "        self.head = torch.nn.Linear(16, 3)\n"
        "    def forward(self, x):  # x: (B, T, 16)\n"
        "        return self.head(x + self.pos_embedding[:, : x.shape[1]])\n"
        "def build():\n"
        "    return Tiny()\n")
    torch.manual_seed(0)
    m = torchslim.build_model(f"py:{tmp_path / 'tiny.py'}:build").eval()
    pos = m.pos_embedding.detach()                                  # (1, 5, 16)
    resize_tensor(m, "pos_embedding", torch.cat([pos, pos[:, 1:]], dim=1))   # (1, 9, 16)
    torchslim.save(m, tmp_path / "v")
    back = torchslim.load(tmp_path / "v", trust_code=True)
    assert back.pos_embedding.shape == (1, 9, 16) and isinstance(back.pos_embedding, nn.Parameter)
    _same_outputs(m, back, torch.randn(2, 9, 16))
    assert edits_of(back) == edits_of(m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_reloads_in_its_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    m = torchslim.build_model("zoo:digits-cnn").to(dtype).eval()
    torchslim.save(m, tmp_path / "h")
    back = torchslim.load(tmp_path / "h")
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert back[0].weight.device.type == "cpu"
    _same_outputs(m, back, torch.randn(3, 1, 8, 8, dtype=dtype))


def test_fp16_model_quantized_keeps_fp16_and_runs(tmp_path):
    """Regression: quantizing an fp16 model made a float32 bias and the forward failed."""
    torch.manual_seed(0)
    m = torchslim.build_model("zoo:lenet-300-100").half().eval()
    q = torchslim.apply(m, LinearQuantConfig(bits=8))
    assert q[1].bias.dtype == torch.float16
    x = torch.randn(4, 1, 28, 28, dtype=torch.float16)
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torchslim.save(q, tmp_path / "q")
    back = torchslim.load(tmp_path / "q")
    _same_outputs(q, back, x)


def test_edit_to_an_unregistered_class_is_refused_before_any_change():
    class Mine(nn.Linear):
        pass
    m = torchslim.build_model("zoo:lenet-300-100")
    before = m[1]
    with pytest.raises(TypeError, match="not rebuildable"):
        replace_module(m, "1", Mine(784, 300))
    assert m[1] is before and edits_of(m) == []


def test_huge_edited_width_is_not_allocated_before_the_shape_check(tmp_path):
    """A manifest edited to a 10^10-wide layer is rebuilt on meta and refused by the shape check."""
    m = torchslim.build_model("zoo:lenet-300-100")
    replace_module(m, "1", nn.Linear(784, 300))
    torchslim.save(m, tmp_path / "a")
    mf = tmp_path / "a" / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["edits"][0]["args"]["out_features"] = 10**10
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has shape"):
        torchslim.load(tmp_path / "a")


# -- honest storage -------------------------------------------------------------------------
def _size(model, path) -> int:
    return torchslim.save(model, path)


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return torchslim.build_model("zoo:lenet-300-100").eval()


def test_sub_byte_codes_are_packed_on_disk(tmp_path, lenet):
    sizes = {b: _size(torchslim.apply(lenet, LinearQuantConfig(bits=b)), tmp_path / f"q{b}") for b in (8, 6, 4, 3, 2)}
    assert sizes[4] <= 0.55 * sizes[8], sizes
    assert sizes[2] <= 0.30 * sizes[8], sizes
    assert sizes[8] > sizes[6] > sizes[4] > sizes[3] > sizes[2], sizes
    for b in (4, 3, 2):
        q = torchslim.apply(lenet, LinearQuantConfig(bits=b))
        back = torchslim.load(tmp_path / f"q{b}")
        assert torch.equal(back[1].weight_q, q[1].weight_q)
        manifest = json.loads((tmp_path / f"q{b}" / "manifest.json").read_text())
        entry = manifest["tensors"]["1.weight_q"]
        assert entry["encoding"] in ("packed", "ans")           # bit-packed, or entropy-coded when smaller
        assert entry["encoding"] == "ans" or entry["meta"]["bits"] <= b


@pytest.mark.parametrize("bits", [8, 4])
def test_pruned_then_affine_quantized_stays_sparse_and_counted(tmp_path, lenet, bits):
    pruned = torchslim.apply(lenet, MagnitudePruneConfig(sparsity=0.9, scope="layer"))
    _, pruned_nnz = count_params(pruned)
    sym = torchslim.apply(pruned, LinearQuantConfig(bits=bits, symmetric=True))
    aff = torchslim.apply(pruned, LinearQuantConfig(bits=bits, symmetric=False))
    # affine codes of pruned weights equal the channel's zero point, not 0: still zeros
    assert count_params(aff) == count_params(sym)
    assert count_params(aff)[1] <= pruned_nnz
    assert count_params(aff)[1] >= pruned_nnz - 200  # a few tiny survivors may round to zero
    s_sym, s_aff = _size(sym, tmp_path / "s"), _size(aff, tmp_path / "a")
    assert s_aff <= 1.10 * s_sym, (s_aff, s_sym)
    assert s_aff < _size(pruned, tmp_path / "p")
    back = torchslim.load(tmp_path / "a")
    assert torch.equal(back[1].weight_q, aff[1].weight_q)
    assert count_params(back) == count_params(aff)


def test_quantized_params_count_logical_weights(lenet):
    q = torchslim.apply(lenet, LinearQuantConfig(bits=8))
    assert count_params(q)[0] == count_params(lenet)[0] == 266610


def test_non_persistent_buffers_keep_their_computed_values(tmp_path, monkeypatch):
    """A buffer no state_dict holds (position ids, rotary tables) is computed by the constructor
    while the weights stay on meta until the artifact's tensors are assigned."""
    import torchslim.artifact as art

    (tmp_path / "rot.py").write_text(
        "import torch\n"
        "class Rot(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.register_buffer('inv_freq', 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), persistent=False)\n"
        "        self.lin = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x * self.inv_freq)\n"
        "def build():\n"
        "    return Rot()\n")
    torch.manual_seed(0)
    m = torchslim.build_model(f"py:{tmp_path / 'rot.py'}:build").eval()
    torchslim.save(m, tmp_path / "r")
    modes = []
    real = art._rebuild
    monkeypatch.setattr(art, "_rebuild", lambda *a, **k: modes.append(k["mode"]) or real(*a, **k))
    back = torchslim.load(tmp_path / "r", trust_code=True)
    assert modes == ["meta", "weights"]            # never a full CPU build of the weights
    torch.testing.assert_close(back.inv_freq, m.inv_freq, rtol=0, atol=0)
    _same_outputs(m, back, torch.randn(3, 4))


def test_artifact_loads_in_a_fresh_process_without_any_method(tmp_path, lenet):
    """Layers and encodings live in the core: loading a quantized, pruned artifact imports no
    method package and does not walk the method registry."""
    import subprocess
    import sys

    q = torchslim.apply(torchslim.apply(lenet, MagnitudePruneConfig(sparsity=0.5)), LinearQuantConfig(bits=4))
    torchslim.save(q, tmp_path / "q")
    torch.save(q(torch.ones(1, 1, 28, 28)).detach(), tmp_path / "want.pt")
    code = (
        "import sys, torch, torchslim.artifact as a, torchslim.registry as r\n"
        f"m = a.load({str(tmp_path / 'q')!r})\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)\n"
        "assert torch.equal(m(torch.ones(1, 1, 28, 28)), want)\n"
        "methods = sorted(k for k in sys.modules if k.startswith('torchslim.methods.') and not k.endswith('primitives'))\n"
        "print(methods, r._LOADED)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['torchslim.methods.quantize'] False", out.stdout
