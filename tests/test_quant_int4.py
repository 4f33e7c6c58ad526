"""Weight-only int4 on PyTorch's CPU kernel (``Int4Linear``, ``quantize.linear`` with
``kernel: int4pack | auto``): the kernel against a float64 product on the dequantized weight,
the dequantized path above ``max_rows``, reload, the whole-model choice, refusals."""

from __future__ import annotations

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.layers import Int4Linear, QuantLinear
from torchslim.layers.int4 import float_compute, int4_kernel_available
from torchslim.methods.quantize import int4 as int4_method
from torchslim.methods.quantize.int8 import input_rows
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.registry import get_method
from torchslim.session import Session

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel in this torch")


def _mlp() -> torch.nn.Module:
    """zoo:mlp 64 -> 64 -> 32 -> 16: every Linear fits the kernel at group 32."""
    return torchslim.build_model("zoo:mlp", args={"in_features": 64, "hidden": [64, 32], "num_classes": 16}).eval()


def _quantize(model: torch.nn.Module, task, **options):
    ctx = Session(task=task)
    q = get_method("quantize", "linear").handler(model, LinearQuantConfig(**options), ctx)
    return q.eval(), ctx.info.get("metrics", {})


@pytest.mark.parametrize("symmetric,group", [(True, 32), (False, 64)])
def test_kernel_matches_float64_product_within_bf16_rounding(symmetric, group):
    torch.manual_seed(group)
    lin = torch.nn.Linear(128, 48)
    layer = Int4Linear.from_float(lin, bits=4, granularity="group", group_size=group, symmetric=symmetric).eval()
    x = torch.randn(2, 5, 128)
    with torch.inference_mode():
        assert layer.runs_on(x) == "int4pack"
        y = layer(x)
    w = layer._dequantize().double()                                   # (48, 128): what the codes say
    xb = x.to(torch.bfloat16).double()                                 # the kernel's activations
    ref = xb @ w.t() + lin.bias.detach().double()
    # bf16 scales (2^-9 relative) and the bf16 output (2^-9 of |y|) bound the error by
    # 2^-8 * sum |x| |w|; 2^-7 leaves room for the float32 accumulation
    bound = 2.0 ** -7 * (xb.abs() @ w.abs().t()) + 1e-6
    assert y.dtype == torch.float32 and y.shape == (2, 5, 48)
    assert bool(((y.double() - ref).abs() <= bound).all())
    assert float((y.double() - ref).abs().max()) > 0    # the kernel ran (bf16 rounds), not float32


def test_rows_above_max_rows_run_quantlinear_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    qargs = dict(bits=4, granularity="group", group_size=32, symmetric=True)
    layer = Int4Linear.from_float(lin, max_rows=4, **qargs).eval()
    plain = QuantLinear.from_float(lin, **qargs).eval()
    few, many = torch.randn(4, 64), torch.randn(2, 3, 64)              # 4 rows, 6 rows
    with torch.inference_mode():
        assert layer.runs_on(few) == "int4pack" and layer.runs_on(many) == "dequant"
        assert torch.equal(layer(many), plain(many))
        assert not torch.equal(layer(few), plain(few))
    assert layer.runs_on(few) == "dequant"                            # gradients on: float compute
    assert torch.equal(layer(few), plain(few))
    assert set(layer.state_dict()) == set(plain.state_dict())         # nothing packed is stored


def test_int4pack_reload_gives_identical_outputs(tmp_path):
    task = torchslim.build_task("shape:1x64")
    q, metrics = _quantize(_mlp(), task, bits=4, granularity="group", group_size=32, kernel="int4pack")
    assert [type(m) for m in q.modules() if isinstance(m, QuantLinear)] == [Int4Linear] * 3
    assert metrics["int4"]["kernel"] == "int4pack" and metrics["int4"]["layers"] == 3
    torchslim.save(q, tmp_path / "int4")
    back = torchslim.load(tmp_path / "int4").eval()
    assert [(m.kernel, m.max_rows) for m in back.modules() if isinstance(m, Int4Linear)] == [("int4pack", None)] * 3
    plain, _ = _quantize(_mlp(), task, bits=4, granularity="group", group_size=32, kernel="dequant")
    assert set(back.state_dict()) == set(plain.state_dict())
    with torch.inference_mode():
        for bs in (1, 32):
            x = task.example_inputs(bs)[0]
            assert torch.equal(q(x), back(x))


def test_auto_sets_max_rows_from_whole_model_timings(tmp_path, monkeypatch):
    monkeypatch.setattr(int4_method, "ROUNDS", 1)
    monkeypatch.setattr(int4_method, "MIN_RUN_TIME", 0.002)
    task = torchslim.build_task("shape:1x64")
    q, metrics = _quantize(_mlp(), task, bits=4, granularity="group", group_size=32)
    row = metrics["int4"]
    assert row["batch_sizes"] == [1, 32] and len(row["int4pack_ms"]) == len(row["dequant_ms"]) == 2
    wins = [i < d for i, d in zip(row["int4pack_ms"], row["dequant_ms"])]
    expect_bs = 0 if not wins[0] else (32 if wins[1] else 1)
    assert row["max_batch_size"] == expect_bs
    layers = {n: m for n, m in q.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 3
    rows = input_rows(q, list(layers), task, (expect_bs,)) if expect_bs else {n: [0] for n in layers}
    assert {n: m.max_rows for n, m in layers.items()} == {n: max(r) for n, r in rows.items()}
    assert {m.kernel for m in layers.values()} == {"int4pack" if expect_bs else "dequant"}
    assert ("note" in row) == (expect_bs == 0)
    torchslim.save(q, tmp_path / "auto")
    back = torchslim.load(tmp_path / "auto")
    assert [(m.kernel, m.max_rows) for m in back.modules() if isinstance(m, Int4Linear)] == \
        [(m.kernel, m.max_rows) for m in layers.values()]


def test_auto_leaves_other_quantization_alone():
    task = torchslim.build_task("shape:1x64")
    q, metrics = _quantize(_mlp(), task, bits=8, granularity="group", group_size=32)
    assert "int4" not in metrics and not any(isinstance(m, Int4Linear) for m in q.modules())
    q, metrics = _quantize(_mlp(), None, bits=4, granularity="group", group_size=32)   # nothing to time on
    assert "int4" not in metrics and not any(isinstance(m, Int4Linear) for m in q.modules())


def test_refusals():
    with pytest.raises(RecipeError, match="int4pack runs weight-only 4-bit group codes"):
        LinearQuantConfig(bits=8, granularity="group", group_size=32, kernel="int4pack").validate()
    with pytest.raises(RecipeError, match="int4pack runs weight-only"):
        LinearQuantConfig(bits=4, granularity="channel", kernel="int4pack").validate()
    with pytest.raises(RecipeError, match="takes group_size 32, 64, 128, 256, not 16"):
        LinearQuantConfig(bits=4, granularity="group", group_size=16, kernel="int4pack").validate()
    config = LinearQuantConfig(bits=4, granularity="group", group_size=32, kernel="int4pack", ignore=("5",))
    with pytest.raises(RecipeError, match="group_size: 32 does not divide"):   # the general check first
        config.check_model(torchslim.build_model("zoo:lenet-300-100"))
    mlp = torchslim.build_model("zoo:mlp", args={"in_features": 64, "hidden": [64, 40]})   # 64 -> 64 -> 40 -> 10
    with pytest.raises(RecipeError, match=r"int4pack cannot run 1 targeted Linear layer\(s\): 3: its 40 outputs "
                                          r"are not a multiple of 16 \(the kernel's packing\); add them to ignore"):
        config.check_model(mlp)
    with pytest.raises(RecipeError, match="3: its 40 outputs"):                # the method checks before it runs
        torchslim.apply(mlp, config)
    with pytest.raises(ValueError, match=r"Int4Linear\(64, 24\): its 24 outputs are not a multiple of 16"):
        Int4Linear(64, 24, group_size=32)
    with pytest.raises(ValueError, match=r"Int4Linear\(48, 32\): group_size 32 does not divide its 48 inputs"):
        Int4Linear(48, 32, group_size=32)
    with pytest.raises(ValueError, match="needs bits 4 and granularity group"):
        Int4Linear(64, 32, bits=8, group_size=32)


def test_onnx_export_keeps_codes_and_checks_against_the_float_path(tmp_path):
    pytest.importorskip("onnxruntime")
    from torchslim.onnx_io import check_onnx, export_onnx
    q, _ = _quantize(_mlp(), None, bits=4, granularity="group", group_size=32, kernel="int4pack")
    x = torch.randn(4, 1, 64)
    path = export_onnx(q, (x,), tmp_path / "m.onnx", exporter="torchscript")   # the faster exporter
    with torch.inference_mode():
        kernel = q(x)                                                  # bf16 kernel: ~1e-3 off the file
        with float_compute():
            ref = q(x)
    assert float((kernel - ref).abs().max()) > 1e-5                   # the kernel's bf16 rounding shows
    # the file computes on the dequantized weight; the check compares it with that path exactly
    assert check_onnx(q, path, (x,), atol=1e-5, rtol=1e-5) <= 1e-5


def test_dynamo_export_of_int4_layers_with_a_row_limit_keeps_the_batch_dynamic(tmp_path):
    """``kernel: auto`` sets ``max_rows``: the export must not trace that comparison (it would fix
    the batch size of the file); exported layers compute on their float weights."""
    ort = pytest.importorskip("onnxruntime")
    from torchslim.onnx_io import export_onnx

    q, _ = _quantize(_mlp(), None, bits=4, granularity="group", group_size=32, kernel="int4pack")
    for m in q.modules():
        if isinstance(m, Int4Linear):
            m.max_rows = 2
    path = export_onnx(q, (torch.randn(1, 1, 64),), tmp_path / "m.onnx")          # dynamo, the default
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 64)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad(), float_compute():
        torch.testing.assert_close(got, q(x), rtol=1e-4, atol=1e-5)


def test_macs_of_int4_layers_are_counted_like_the_float_model():
    from torchslim.measure import count_macs
    model = _mlp()
    q, _ = _quantize(model, None, bits=4, granularity="group", group_size=32, kernel="int4pack")
    x = (torch.randn(1, 1, 64),)
    assert count_macs(q, x) == count_macs(model, x) > 0
