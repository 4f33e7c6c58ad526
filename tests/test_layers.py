"""``torchslim layers``: every module's name (what targets/ignore take), type, parameters, MACs
and output shape, for every model source."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim
from torchslim.cli import main
from torchslim.measure import count_macs, count_params, layer_table
from torchslim.modules import check_patterns


def _check(model, task, functional_macs=0, uncalled=()):
    rows = layer_table(model, task)
    root = rows[0]
    assert root["name"] == "" and root["params"] == count_params(model)[0]
    assert root["macs"] == count_macs(model, task.example_inputs(1))
    named = dict(model.named_modules())
    assert [r["name"] for r in rows] == list(named)
    leaves = [r for r in rows[1:] if not list(named[r["name"]].children())]
    # every MAC belongs to a leaf layer, but for products a module computes itself (attention scores)
    assert sum(r["macs"] for r in leaves) == root["macs"] - functional_macs
    # every leaf that runs has its output shape (batch 1); a module whose weight its parent uses
    # directly never runs (nn.MultiheadAttention's out_proj)
    assert {r["name"] for r in leaves if r["output_shape"] is None} <= set(uncalled)
    assert all(r["output_shape"][0] == 1 for r in leaves if r["output_shape"] is not None)
    check_patterns(model, [r["name"] for r in rows[1:]], "targets")  # the names are valid targets
    return rows


def test_zoo_and_torchvision_models():
    rows = _check(torchslim.build_model("zoo:lenet-5"), torchslim.build_task("shape:1x28x28"))
    assert [(r["name"], r["type"], r["params"], r["output_shape"]) for r in rows[1:3]] == [
        ("0", "Conv2d", 520, (1, 20, 24, 24)), ("1", "MaxPool2d", 0, (1, 20, 12, 12))]
    rows = _check(torchslim.build_model("torchvision:resnet18", args={"num_classes": 10}),
                  torchslim.build_task("shape:3x32x32"))
    conv1 = next(r for r in rows if r["name"] == "conv1")
    assert conv1["macs"] == 64 * 3 * 7 * 7 * 16 * 16 and conv1["output_shape"] == (1, 64, 16, 16)


def test_hf_py_and_artifact_models(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    # attention scores and weighted values: 2 layers x 2 products x (8 x 8 x 32) MACs, in BertSelfAttention
    # (an SDPA attention path takes dropout as an argument, so its Dropout module may never run)
    rows = _check(torchslim.build_model(f"hf:{tmp_path / 'bert'}"), torchslim.build_task("shape:8"),
                  functional_macs=2 * 2 * 8 * 8 * 32,
                  uncalled=[f"encoder.layer.{i}.attention.self.dropout" for i in range(2)])
    q = next(r for r in rows if r["name"] == "encoder.layer.0.attention.self.query")
    assert q["type"] == "Linear" and q["macs"] == 8 * 32 * 32 and q["output_shape"] == (1, 8, 32)

    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    from pathlib import Path
    assets = Path(__file__).parent / "assets" / "architectures.py"
    # nn.MultiheadAttention computes in its own forward: the packed q/k/v projection (a bare
    # parameter), the attention products, and out_proj (its weight used directly, not its module)
    per_layer = 12 * 32 * 96 + 2 * 12 * 12 * 32 + 12 * 32 * 32
    _check(torchslim.build_model(f"py:{assets}:encoder"), torchslim.build_task("shape:12"),
           functional_macs=2 * per_layer,
           uncalled=[f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)])
    torchslim.save(torchslim.build_model("zoo:digits-cnn"), tmp_path / "art")
    _check(torchslim.build_model(f"artifact:{tmp_path / 'art'}"), torchslim.build_task("digits"))


def test_cli_layers_table_and_json(tmp_path, capsys):
    assert main(["layers", "zoo:lenet-5", "--task", "shape:1x28x28", "--json", str(tmp_path / "l.json")]) == 0
    out = capsys.readouterr().out
    assert "output shape" in out and "1x20x24x24" in out and "2,293,000" in out
    rows = json.loads((tmp_path / "l.json").read_text())
    assert rows[0]["macs"] == 2293000 and rows[1]["output_shape"] == [1, 20, 24, 24]
    assert main(["layers", "zoo:lenet-5"]) == 0                      # no task: names, types, params
    first_layer = capsys.readouterr().out.splitlines()[3].split()
    assert first_layer[:4] == ["0", "Conv2d", "520", "520"] and first_layer[4:] == ["-", "-"]
    assert main(["layers", "zoo:lenet-6"]) == 2
    assert "error:" in capsys.readouterr().err
