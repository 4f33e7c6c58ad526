"""The per-layer error every quantize step records (``quantized_layers``): output SQNR on the
float model's inputs to each layer, against a numpy computation; bits, scheme; shape tasks."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import torchslim
from torchslim.layers import QuantLinear
from torchslim.methods.quantize.layer_error import FloatReference
from torchslim.registry import get_method
from torchslim.session import Session
from torchslim.specs.tasks import Task

#: nn.TransformerEncoder on token ids (a py: test architecture: TORCHSLIM_TRUST_CODE)
ENCODER = f"py:{Path(__file__).parent / 'assets' / 'architectures.py'}:encoder"


@pytest.fixture(scope="module")
def data_root_module():
    from conftest import data_dir

    d = data_dir()
    if d is None or not (d / "mnist").is_dir():
        pytest.skip("MNIST not found: set TORCHSLIM_DATA to the folder holding mnist/")
    return d


@pytest.fixture(scope="module")
def mnist(data_root_module):
    return torchslim.build_task("mnist", str(data_root_module))


def _quantize(key: str, model, task, **fields):
    """Run method ``key`` (``quantize.NAME``) on a copy of ``model`` with ``fields``; returns the
    quantized model and the step's row fields."""
    entry = get_method(*key.split("."))
    config = entry.config_cls.from_dict(fields) if fields else entry.config_cls.example()
    session = Session(task=task)
    torch.manual_seed(0)
    out = entry.handler(copy.deepcopy(model), config, session)
    return out, session.info["metrics"]


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise)


def test_output_and_weight_sqnr_match_numpy(mnist):
    """Layer 3 of LeNet-300-100 (300 -> 100), 4-bit codes in groups of 4: its input is the
    *float* model's ReLU(layer 1) output (layer 1 is quantized too), recomputed here in numpy
    from the same calibration images."""
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    q, row = _quantize("quantize.linear", model, mnist, bits=4, granularity="group", group_size=4)
    entry = {r["name"]: r for r in row["quantized_layers"]}["3"]
    assert entry["scheme"] == "int4 symmetric per-group g4" and entry["bits"] == 4 and entry["group_size"] == 4
    assert [r["name"] for r in row["quantized_layers"]] == ["1", "3", "5"]
    assert row["quantized_layers_input"] == "32 calibration examples of the train split (2 batch(es) of at most 16)"

    images = torch.cat([b[0] for b in Session(task=mnist).calibration_batches(32, batch_size=16)])
    x = images.reshape(len(images), -1).double().numpy()                          # (64, 784)
    p = {k: v.double().numpy() for k, v in model.state_dict().items()}
    h = np.maximum(x @ p["1.weight"].T + p["1.bias"], 0)                          # (64, 300): input of layer 3
    codes = q[3].weight_q.numpy().astype(np.float64).reshape(100, 75, 4)        # (out, groups, 4)
    w_q = (codes * q[3].scale.double().numpy()[:, :, None]).reshape(100, 300)
    y, y_q = h @ p["3.weight"].T + p["3.bias"], h @ w_q.T + p["3.bias"]
    assert entry["sqnr_db"] == pytest.approx(_db((y ** 2).sum(), ((y - y_q) ** 2).sum()), abs=2e-3)
    w = p["3.weight"]
    assert entry["weight_sqnr_db"] == pytest.approx(_db((w ** 2).sum(), ((w - w_q) ** 2).sum()), abs=2e-3)
    assert 15 < entry["sqnr_db"] < 40      # 4 bits: about 6 dB a bit


def test_eight_bits_measure_above_four_bits_on_every_layer(mnist):
    model = torchslim.build_model("zoo:lenet-5").eval()
    rows = {bits: {r["name"]: r for r in _quantize("quantize.linear", model, mnist, bits=bits)[1]["quantized_layers"]}
            for bits in (4, 8)}
    assert list(rows[4]) == list(rows[8]) == ["0", "2", "5", "7"]
    for name in rows[4]:
        four, eight = rows[4][name], rows[8][name]
        # 4 more bits: about 24 dB (6.02 dB a bit) of output and weight SQNR
        assert eight["sqnr_db"] - four["sqnr_db"] > 15, (name, four, eight)
        assert eight["weight_sqnr_db"] - four["weight_sqnr_db"] > 15, (name, four, eight)


#: the registry's quantize methods on their examples, plus int8 activations (integer kernels)
CASES = [(e.key, {}) for e in torchslim.list_methods("quantize.*")] + [
    ("quantize.linear", {"activations": "dynamic", "kernel": "int8"})]


@pytest.mark.parametrize("key,fields", CASES, ids=[f"{k}{'-' + '-'.join(map(str, f.values())) if f else ''}"
                                                   for k, f in CASES])
def test_every_quantize_method_records_its_layers(key, fields, mnist):
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    out, row = _quantize(key, model, mnist, **fields)
    quantized = {n: m for n, m in out.named_modules() if hasattr(m, "weight_q")}
    entries = row["quantized_layers"]
    assert [r["name"] for r in entries] == list(quantized) and entries
    for r in entries:
        layer = quantized[r["name"]]
        assert r["type"] == type(layer).__name__ and r["bits"] == layer.bits and r["scheme"]
        # every layer is called on the calibration images: both errors measured, finite, positive
        assert r["sqnr_db"] > 0 and r["weight_sqnr_db"] > 0, r
    if fields:   # int8 activations: the output error includes them, the weight error does not
        assert all(r["scheme"] == "int8 w8a7 dynamic (symmetric per-channel weights)" for r in entries)


def test_shape_task_uses_its_example_inputs_and_says_so(monkeypatch):
    """A transformer encoder on a shape: task: the attention block measured on random token
    inputs; its out_proj, whose weight nn.MultiheadAttention reads, gets the weight SQNR alone."""
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")   # the py: test architecture is ours
    model = torchslim.build_model(ENCODER).eval()
    _, row = _quantize("quantize.linear", model, torchslim.build_task("shape:12"), bits=8)
    assert "example inputs" in row["quantized_layers_input"] and "shape:12 has no data" in row["quantized_layers_input"]
    by_name = {r["name"]: r for r in row["quantized_layers"]}
    attn, out_proj = by_name["encoder.layers.0.self_attn"], by_name["encoder.layers.0.self_attn.out_proj"]
    assert attn["type"] == "QuantMultiheadAttention" and attn["sqnr_db"] > 30
    assert out_proj["sqnr_db"] is None and "not called" in out_proj["note"] and out_proj["weight_sqnr_db"] > 30


def test_without_a_task_only_the_weight_error_is_given():
    model = torchslim.build_model("zoo:lenet-300-100")
    w = model[5].weight.detach().double().numpy()
    reference = FloatReference(model, Session())
    torchslim.edits.replace_module(model, "5", QuantLinear.from_float(model[5], bits=3))
    (entry,) = reference.record(model)
    w_q = (model[5].weight_q.numpy() * model[5].scale.numpy()).astype(np.float64)
    assert entry["name"] == "5" and entry["scheme"] == "int3 symmetric per-channel"
    assert entry["sqnr_db"] is None and "note" not in entry
    assert entry["weight_sqnr_db"] == pytest.approx(_db((w ** 2).sum(), ((w - w_q) ** 2).sum()), abs=2e-3)


class TokenTask(Task):
    """Token sequences with padding: ``(input_ids, attention_mask, target)`` batches of a fixed
    set of 64 random sequences of 4 to 16 tokens, padded to 16 (every split the same)."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self) -> None:
        super().__init__("tokens")
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(4, 17, (64,), generator=g)
        mask = (torch.arange(16) < lengths[:, None]).long()                                # (64, 16)
        ids = torch.randint(1000, 2000, (64, 16), generator=g) * mask
        self.data = torch.utils.data.TensorDataset(ids, mask, torch.zeros(64))

    def _load_splits(self):
        return {"train": self.data, "val": self.data, "test": self.data}

    def forward(self, model, batch):
        return model(batch[0])       # the model computes every position, padding included


def test_padding_positions_of_a_token_task_are_left_out(monkeypatch):
    """A transformer encoder on padded token batches: a feed-forward layer's output SQNR is summed
    over the positions the attention mask keeps (the others are computed but never used), as
    numpy computes it from the float model's inputs to the layer."""
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")   # the py: test architecture is ours
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER).eval()
    task, name = TokenTask(), "encoder.layers.1.linear1"
    q, row = _quantize("quantize.linear", model, task, bits=4, targets=[name])
    (entry,) = row["quantized_layers"]

    session = Session(task=task)
    batches = session.calibration_batches(32, batch_size=16)
    with torch.no_grad(), session.capture(model, [name]) as got:
        for batch in batches:
            task.forward(model, batch)
    x = torch.cat([i.reshape(-1, 32) for i in got[name]["inputs"]]).double().numpy()         # (tokens, 32)
    kept = torch.cat([b[1].reshape(-1) for b in batches]).numpy() == 1                      # (tokens,)
    layer = q.get_submodule(name)
    w_q = layer.weight_q.double().numpy() * layer.scale.double().numpy()
    w, b = (t.detach().double().numpy() for t in (model.get_submodule(name).weight, model.get_submodule(name).bias))
    y, y_q = x @ w.T + b, x @ w_q.T + b
    assert entry["sqnr_db"] == pytest.approx(_db((y[kept] ** 2).sum(), ((y - y_q)[kept] ** 2).sum()), abs=2e-3)
    assert abs(entry["sqnr_db"] - _db((y ** 2).sum(), ((y - y_q) ** 2).sum())) > 0.01   # padding would count
    assert 0.4 < kept.mean() < 0.9


def test_coded_fine_tuning_comes_after_the_measurement(mnist, monkeypatch):
    """k-means with a fine-tune of its centroids: the row gives the error of the clustering
    itself (the same figures as without fine-tuning) and says so. The trainer is replaced by a
    stand-in that moves every centroid (what training does, without the epoch's cost)."""
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    _, plain = _quantize("quantize.kmeans", model, mnist, bits=3)
    trained = []

    def train(self, model, config, *, desc, **kwargs):
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "codebook"):
                    m.codebook.mul_(1.5)
        trained.append(desc)
        return model

    monkeypatch.setattr(Session, "train", train)
    tuned, row = _quantize("quantize.kmeans", model, mnist, bits=3, finetune={"epochs": 1})
    assert trained == ["kmeans-finetune"]
    assert row["quantized_layers"] == plain["quantized_layers"]
    assert row["quantized_layers_input"] == plain["quantized_layers_input"] + ", before fine-tuning"
    # measured after the stand-in fine-tune, the moved centroids show in every layer's figures
    after = FloatReference(model, Session(task=mnist)).record(tuned)
    assert [r["name"] for r in after] == [r["name"] for r in plain["quantized_layers"]]
    for late, early in zip(after, plain["quantized_layers"]):
        assert late["weight_sqnr_db"] < early["weight_sqnr_db"] - 3 and late["sqnr_db"] < early["sqnr_db"] - 3
