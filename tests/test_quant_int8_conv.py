"""Static int8 convolutions (``Int8Conv2d``, ``quantize.linear`` with ``activations: static`` on
Conv2d): the oneDNN kernel against a float64 emulation, the emulation against float within its
step sizes, reload on the same kernels, refusals."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import torchslim
from torchslim.errors import RecipeError
from torchslim.layers import Int8Conv2d, Int8Linear, QuantConv2d
from torchslim.layers.int8 import onednn_conv_available
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.linear import LinearQuantConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

needs_onednn = pytest.mark.skipif(not onednn_conv_available(), reason="no oneDNN int8 convolution in this torch")


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchslim.build_model(f"torchvision:{name}")


def _conv(model: str, name: str) -> torch.nn.Conv2d:
    return copy.deepcopy(_model(model).get_submodule(name))


#: a stem (3 channels, stride 2), a dense 3x3, a strided 1x1 shortcut, a depthwise 3x3
CONVS = [("mobilenet_v2", "features.0.0"), ("resnet18", "layer1.0.conv1"), ("resnet18", "layer2.0.downsample.0"),
         ("mobilenet_v2", "features.2.conv.1.0")]


def _inputs(conv: torch.nn.Conv2d, seed: int) -> torch.Tensor:
    """(2, C_in, 12, 12) post-ReLU-like activations: mostly small, some large, none negative."""
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(2, conv.in_channels, 12, 12, generator=g) * 2 + 0.3)


def _layer(conv: torch.nn.Conv2d, x: torch.Tensor, bits: int) -> Int8Conv2d:
    # the conv's own bias is zero in torchvision's init: give it one so the bias path is checked
    if conv.bias is None:
        conv.bias = torch.nn.Parameter(torch.linspace(-1, 1, conv.out_channels))
    return Int8Conv2d.from_float(conv, input_range=(float(x.min()), float(x.max())), bits=bits).eval()


@needs_onednn
@pytest.mark.parametrize("model,name", CONVS)
@pytest.mark.parametrize("bits", [8, 7])
def test_int8_kernel_matches_float64_emulation(model, name, bits):
    conv = _conv(model, name)
    x = _inputs(conv, bits)
    layer = _layer(conv, x, bits)
    with torch.inference_mode():
        assert layer.runs_on(x) == "int8"
        y = layer(x)
    codes, scale, _ = layer._q_tensors("weight")
    ref = P.int8_conv2d_reference(x, codes, scale, layer.bias, (layer.input_scale, layer.input_zero_point),
                                  layer.act_bits, *layer._geometry())
    assert y.shape == conv(x).shape
    # the same integer sums (7-bit inputs with 8-bit weights: no int16 saturation on AVX2); only
    # the float rescale rounds differently, and quantize_per_tensor may round a tie the other way
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("model,name", CONVS)
def test_emulation_error_within_half_an_input_step(model, name):
    conv = _conv(model, name)
    x = _inputs(conv, 0)
    layer = _layer(conv, x, 8)
    codes, scale, _ = layer._q_tensors("weight")
    geometry = layer._geometry()
    y = P.int8_conv2d_reference(x, codes, scale, layer.bias, (layer.input_scale, layer.input_zero_point),
                                layer.act_bits, *geometry).double()
    w_deq = codes.double() * scale.double().reshape(-1, 1, 1, 1)
    exact = F.conv2d(x.double(), w_deq, layer.bias.double(), *geometry)
    # every input inside the calibrated range moves by at most half a step s_x / 2, so each output
    # moves by at most s_x / 2 times the sum of |w| over its receptive field (padding counts 0)
    reach = F.conv2d(torch.ones_like(x, dtype=torch.float64), w_deq.abs(), None, *geometry)
    bound = reach * float(layer.input_scale) / 2
    assert bool(((y - exact).abs() <= bound + 1e-9).all())
    assert float((y - exact).abs().max()) > 0          # activations really were quantized


def test_reference_kernel_where_int8_cannot_run():
    conv = _conv("resnet18", "layer1.0.conv1")
    x = _inputs(conv, 1)
    layer = _layer(conv, x, 8)
    assert layer.runs_on(x) == "reference"               # gradients on: integer kernels have no backward
    assert layer.runs_on(x.double()) == "reference"
    with torch.inference_mode():
        assert layer.runs_on(x[0]) == "reference"        # unbatched (C, H, W)
    codes, scale, _ = layer._q_tensors("weight")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), P.int8_conv2d_reference(
            x, codes, scale, layer.bias, (layer.input_scale, layer.input_zero_point), 7, *layer._geometry()))


@needs_onednn
def test_static_conv_model_reloads_on_the_same_kernels(tmp_path, digits_task):
    from torchslim.methods.quantize.linear import _linear_quant
    from torchslim.session import Session

    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn").eval()
    ctx = Session(task=digits_task)
    config = LinearQuantConfig(activations="static", kernel="int8", calibration={"samples": 64})
    q = _linear_quant(copy.deepcopy(model), config, ctx)
    assert [type(q[i]) for i in (0, 2, 6)] == [Int8Conv2d, Int8Conv2d, Int8Linear]
    int8 = ctx.info["metrics"]["int8"]                                       # the step's metrics row
    assert int8["conv_engine"] == "oneDNN" and int8["kernels"] == {"int8": 4}
    from torchslim.methods.quantize.layer_error import scheme
    assert scheme(q[0]) == "int8 w8a7 static (symmetric per-channel weights)"   # the report's row
    torchslim.save(q, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert not any("packed" in k for k in manifest["tensors"])               # codes only, never packed weights
    back = torchslim.load(tmp_path / "q").eval()
    assert [back[i].kernel for i in (0, 2, 6, 9)] == ["int8"] * 4
    x = digits_task.example_inputs(16)[0]
    with torch.inference_mode():
        y, y_back, y_float = q.eval()(x), back(x), model(x)
    torch.testing.assert_close(y_back, y, rtol=0, atol=0)
    assert float(F.cosine_similarity(y, y_float).min()) > 0.99
    # ONNX holds the weight codes: the integer kernels export their float computation, dynamic batch
    ort = pytest.importorskip("onnxruntime")
    from torchslim.layers.quantized import float_compute
    from torchslim.onnx_io import export_onnx
    path = export_onnx(q, (x[:1],), tmp_path / "q.onnx", exporter="torchscript")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad(), float_compute():
        torch.testing.assert_close(got, q(x), rtol=1e-4, atol=1e-5)


@needs_onednn
def test_auto_keeps_the_kernel_that_timed_faster():
    from torchslim.methods.quantize.int8 import choose_conv_kernel

    for model, name in (CONVS[1], CONVS[3]):        # a dense 3x3 and a depthwise 3x3
        conv = _conv(model, name)
        layer = _layer(conv, _inputs(conv, 0), 8)
        kernel, measured = choose_conv_kernel(layer, [(1, conv.in_channels, 14, 14), (4, conv.in_channels, 14, 14)])
        ratio = math.prod(i / f for i, f in zip(measured["int8_ms"], measured["float_ms"])) ** 0.5
        assert kernel == layer.kernel == ("int8" if ratio <= 1 else "dequant")
        assert measured["shapes"] == [[1, conv.in_channels, 14, 14], [4, conv.in_channels, 14, 14]]


def test_dynamic_activations_on_a_named_conv_are_refused():
    model = torchslim.build_model("zoo:digits-cnn")
    with pytest.raises(RecipeError, match="0 is a Conv2d.*static"):
        torchslim.apply(model, LinearQuantConfig(activations="dynamic", targets=("0", "6")))
    # picked by a pattern, a conv keeps weight-only codes under dynamic
    q = torchslim.apply(model, LinearQuantConfig(activations="dynamic", kernel="int8"))
    assert type(q[0]) is QuantConv2d and type(q[6]) is Int8Linear


def test_layer_refuses_what_the_kernel_cannot_run():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    with pytest.raises(ValueError, match="symmetric weight codes"):
        Int8Conv2d.from_float(conv, input_range=(0.0, 1.0), symmetric=False)
    with pytest.raises(ValueError, match="activations must be 'static'"):
        Int8Conv2d.from_float(conv, input_range=(0.0, 1.0), activations="dynamic")
    with pytest.raises(ValueError, match="needs input_range"):
        Int8Conv2d.from_float(conv)
    with pytest.raises(ValueError, match="not symmetric"):
        Int8Conv2d.from_float(torch.nn.Conv2d(4, 8, 2, padding="same"), input_range=(0.0, 1.0))
    # "same" with an odd kernel is a symmetric pad, "valid" none: both run on the int8 kernel
    for pad, expect in (("same", [1, 1]), ("valid", [0, 0])):
        layer = Int8Conv2d.from_float(torch.nn.Conv2d(4, 8, 3, padding=pad), input_range=(0.0, 1.0))
        assert layer._geometry()[1] == expect
