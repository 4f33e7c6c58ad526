"""int8 execution (``quantize.linear`` with ``activations: dynamic | static``): the integer kernel
against a float64 emulation, the emulation against float within its step sizes, calibration,
reload on the same kernels, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError, UserError
from torchslim.layers import Int8Linear, QuantConv2d
from torchslim.layers.int8 import int8_engine
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.linear import LinearQuantConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # torch's quantized-tensor deprecation

needs_engine = pytest.mark.skipif(int8_engine() is None, reason="no x86/fbgemm quantized engine in this torch")


def _inputs(seed: int) -> torch.Tensor:
    """(2, 5, 64) activations whose tokens differ in range by 100x, as transformer tokens do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 64, generator=g) * torch.logspace(-1, 1, 5)[None, :, None]


@needs_engine
@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("bits,symmetric", [(7, True), (8, True), (8, False)])
def test_integer_kernel_matches_float64_emulation(activations, bits, symmetric):
    torch.manual_seed(bits)
    lin = torch.nn.Linear(64, 24)
    x = _inputs(bits)
    rng = (float(x.min()), float(x.max())) if activations == "static" else None
    layer = Int8Linear.from_float(lin, activations=activations, input_range=rng, bits=bits,
                                  granularity="channel", group_size=128, symmetric=symmetric).eval()
    with torch.inference_mode():
        y = layer(x)
        assert layer.runs_on(x) == "int8"
    codes, scale, zero = layer._q_tensors("weight")
    static = (layer.input_scale, layer.input_zero_point) if activations == "static" else None
    ref = P.int8_linear_reference(x, codes, scale, zero, lin.bias.detach(), static, P.activation_bits(bits))
    # same integer products; only the float rescaling rounds differently (and, rarely, x / a at a tie)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("act_bits", [8, 7])
def test_per_token_emulation_error_within_half_an_activation_step(act_bits):
    g = torch.Generator().manual_seed(act_bits)
    w = torch.randn(24, 64, generator=g)
    scale, zero = P.choose_qparams(w, 8, "channel")
    codes = P.quantize(w, scale, zero, 8, "channel", 128, True)
    x = _inputs(act_bits).reshape(-1, 64)                                     # (10, 64)
    y = P.int8_linear_reference(x, codes, scale, None, None, None, act_bits)
    w_deq = codes.double() * scale.double()                                    # (24, 64)
    exact = x.double() @ w_deq.t()
    # each activation moves by at most half its token's step a / L, so |dy| <= sum_k |w_k| a / (2L)
    levels = 2 ** (act_bits - 1) - 1
    a = x.abs().amax(-1, keepdim=True).double()
    bound = (a / (2 * levels)) * w_deq.abs().sum(1)[None, :]
    assert bool(((y.double() - exact).abs() <= bound + 1e-6).all())
    # and the per-token scale helps the small tokens: their error is 100x below the large ones'
    err = (y.double() - exact).abs().amax(1)
    assert float(err[0]) < float(err[4]) / 20


def test_static_qparams_cover_the_observed_range():
    scale, zero = P.activation_qparams(torch.tensor(-1.5), torch.tensor(3.6))
    assert float(scale) == pytest.approx(5.1 / 255)
    assert float(zero) == round(1.5 / (5.1 / 255))
    # the range always holds zero (ReLU outputs: [0, hi])
    s2, z2 = P.activation_qparams(torch.tensor(0.5), torch.tensor(2.0), bits=7)
    assert float(z2) == 0 and float(s2) == pytest.approx(2.0 / 127)


@needs_engine
def test_dynamic_model_reloads_on_the_same_kernels(tmp_path, trained_digits, digits_task):
    q = torchslim.apply(trained_digits, LinearQuantConfig(bits=7, activations="dynamic"), task=digits_task)
    assert isinstance(q[6], Int8Linear) and isinstance(q[0], QuantConv2d)   # convs stay weight-only
    torchslim.save(q, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert not any("packed" in k for k in manifest["tensors"])               # codes only, never packed weights
    back = torchslim.load(tmp_path / "q").eval()
    assert [back[i].kernel for i in (6, 9)] == [q[i].kernel for i in (6, 9)]
    x = digits_task.example_inputs(8)[0]
    with torch.inference_mode():
        torch.testing.assert_close(back(x), q.eval()(x), rtol=0, atol=0)
    assert digits_task.evaluate(back) >= digits_task.evaluate(trained_digits) - 0.02


def test_auto_that_keeps_float_everywhere_says_so(trained_digits, digits_task, monkeypatch):
    """kernel: auto timing float faster on every layer leaves weight-only codes: a warning says it
    (and names the way to force integer compute); a forced kernel says nothing."""
    from torchslim.methods.quantize import linear
    from torchslim.pipeline import StepContext

    monkeypatch.setattr(linear, "choose_kernel", lambda layer, rows, **kw: ("dequant", {}))
    ctx = StepContext(task=digits_task)
    q = linear._linear_quant(copy.deepcopy(trained_digits), LinearQuantConfig(bits=7, activations="dynamic"), ctx)
    assert {q[i].kernel for i in (6, 9)} == {"dequant"}
    [warning] = [w for w in ctx.warnings if w["code"] == "int8-all-dequant"]
    assert "kernel: int8" in warning["message"]
    ctx = StepContext(task=digits_task)
    linear._linear_quant(copy.deepcopy(trained_digits), LinearQuantConfig(bits=7, activations="dynamic",
                                                                          kernel="dequant"), ctx)
    assert not [w for w in ctx.warnings if w["code"] == "int8-all-dequant"]


@needs_engine
def test_static_scales_are_the_calibration_min_max(trained_digits, digits_task):
    from torchslim.session import Session

    config = LinearQuantConfig(activations="static", calibration={"samples": 64}, kernel="int8")
    seen: dict[str, list[float]] = {}
    model = copy.deepcopy(trained_digits).eval()
    hooks = [model[i].register_forward_pre_hook(
        lambda m, a, i=i: seen.setdefault(i, []).extend([float(a[0].min()), float(a[0].max())])) for i in (6, 9)]
    with torch.inference_mode():
        for batch in Session(task=digits_task).calibration_batches(64):
            model(batch[0])
    for h in hooks:
        h.remove()
    q = torchslim.apply(trained_digits, config, task=digits_task)
    for i in (6, 9):
        lo, hi = min(min(seen[i]), 0.0), max(max(seen[i]), 0.0)
        assert float(q[i].input_scale) == pytest.approx((hi - lo) / 127, rel=1e-6)   # 8-bit weights: 7-bit inputs
        assert q[i].kernel == "int8"
    assert digits_task.evaluate(q) >= digits_task.evaluate(trained_digits) - 0.02


def test_static_without_calibration_data_is_refused():
    with pytest.raises(RecipeError, match="calibration data"):
        LinearQuantConfig(activations="static").check_ready(torchslim.build_task("shape:1x28x28"))


def test_nan_calibration_inputs_name_the_layer(digits_task):
    model = torchslim.build_model("zoo:digits-cnn")
    with torch.no_grad():
        model[6].bias.fill_(float("nan"))     # layer 9 receives NaN
    with pytest.raises(UserError, match=r"inputs of 9 hold NaN"):
        torchslim.apply(model, LinearQuantConfig(activations="static", calibration={"samples": 32}, targets=("9",)), task=digits_task)


def test_reference_kernel_runs_where_the_engine_cannot():
    lin = torch.nn.Linear(64, 8)
    layer = Int8Linear.from_float(lin, bits=8, granularity="channel", group_size=128, symmetric=True).eval()
    x = _inputs(0)
    assert layer.runs_on(x) == "reference"       # gradients on: integer kernels have no backward
    assert layer.runs_on(x.double()) == "reference"
    with torch.no_grad():
        y = layer(x)
    codes, scale, zero = layer._q_tensors("weight")
    torch.testing.assert_close(y, P.int8_linear_reference(x, codes, scale, zero, lin.bias.detach(), None, 7))
