"""Measurement runtimes: same outputs as eager PyTorch, latency entries, stability, recipe fields.

No assertion here is about absolute wall time (speed lives in bench/); the timings only use
small ``min_run_time`` values so the file stays fast.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError, UserError
from torchslim.measure import measure, measure_latency, time_call, time_fn, time_session
from torchslim.recipe import MeasureConfig, Recipe
from torchslim.runtime import get_runtime, list_runtimes, omp_wait_policy

FAST = 0.02  # seconds of timed calls per measurement: enough for the fields, not for speed claims
# float32 kernels of different engines differ by rounding only
TOL = {"eager": dict(atol=0.0, rtol=0.0), "compile": dict(atol=1e-4, rtol=1e-4),
       "onnxruntime": dict(atol=1e-4, rtol=1e-4)}


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return torchslim.build_model("zoo:lenet-5")


@pytest.fixture(scope="module")
def shape_task():
    return torchslim.build_task("shape:1x28x28")


def _prepare(rt, model, inputs):
    try:
        return rt.prepare(model, inputs)
    except UserError as exc:
        if rt.name == "compile":
            pytest.skip(f"torch.compile is unavailable on this machine: {exc}")
        raise


def _check_timing(t, threads):
    assert t.median_ms > 0 and t.iqr_ms >= 0 and t.cpu_ms > 0 and t.runs >= 1
    assert t.threads == threads


@pytest.mark.parametrize("name", ["eager", "onnxruntime", "compile"])
def test_runtime_matches_eager_and_is_timed(name, lenet, shape_task):
    if name == "onnxruntime":
        pytest.importorskip("onnxruntime")
    # compile: one shape only (each new shape is one more compilation)
    inputs = {bs: shape_task.example_inputs(bs) for bs in ((1,) if name == "compile" else (1, 5))}
    with torch.no_grad():
        want = {bs: lenet.eval()(*x) for bs, x in inputs.items()}
    model = lenet.train()
    x1 = inputs[1]
    with get_runtime(name) as rt:
        assert rt.name == name
        session = _prepare(rt, model, x1)
        if name != "onnxruntime":  # (ONNX export restores the flag at once)
            assert not model.training  # prepared models run in eval mode
        for bs, x in inputs.items():
            torch.testing.assert_close(session(*x).cpu(), want[bs], **TOL[name])
        timing = time_session(session, x1, min_run_time=FAST)
        _check_timing(timing, session.threads)
        assert session.runtime == name
    assert model.training  # closing the runtime restores the training flag
    assert session.closed


@pytest.mark.parametrize("name", ["eager", "onnxruntime"])
def test_measure_records_runtime_and_latency(name, lenet, shape_task):
    if name == "onnxruntime":
        pytest.importorskip("onnxruntime")
    r = measure(lenet, shape_task, batch_sizes=(1, 4), runtime=name, min_run_time=FAST)
    for key in ("params", "nonzero_params", "size_bytes", "macs", "latency_ms", "metric"):
        assert key in r
    assert r["metric"] is None  # shape: tasks have no metric
    assert r["runtime"] == {"name": name, "threads": torch.get_num_threads(),
                            "omp_wait_policy": omp_wait_policy()}
    assert set(r["latency_ms"]) == set(r["latency"]) == {"1", "4"}
    for bs, entry in r["latency"].items():
        assert r["latency_ms"][bs] == entry["median_ms"] > 0
        assert entry["iqr_ms"] >= 0 and entry["cpu_ms"] > 0 and entry["runs"] >= 1
        assert entry["threads"] == torch.get_num_threads()


def test_measure_without_latency_skips_runtime(lenet, shape_task):
    r = measure(lenet, shape_task, latency=False)
    assert not {"latency_ms", "latency", "runtime"} & set(r)


def test_unknown_runtime_names_close_matches(lenet, shape_task):
    with pytest.raises(RecipeError, match=r"unknown runtime 'onnxrutime'.*did you mean 'onnxruntime'"):
        get_runtime("onnxrutime")
    with pytest.raises(RecipeError, match="did you mean 'eager'"):
        measure(lenet, shape_task, runtime="eagr", batch_sizes=(1,), min_run_time=FAST)
    assert {"eager", "compile", "onnxruntime"} <= set(list_runtimes())


def test_onnxruntime_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # find_spec() then reports it missing
    with pytest.raises(UserError, match=r"pip install 'torchslim\[onnx\]'"):
        get_runtime("onnxruntime")
    with pytest.raises(UserError, match=r"torchslim\[onnx\]"):
        MeasureConfig(runtime="onnxruntime").check_ready()


def test_unstable_callable_is_flagged_and_steady_one_is_not():
    calls = itertools.count()

    def alternating():
        time.sleep(0.0005 if next(calls) % 2 else 0.02)

    unsteady = time_fn(alternating, min_run_time=0.1, attempts=2)
    assert unsteady.unstable is True and unsteady.to_dict()["unstable"] is True
    steady = time_fn(lambda: time.sleep(0.01), min_run_time=0.1)
    assert steady.unstable is False and "unstable" not in steady.to_dict()
    assert steady.runs >= 1 and steady.median_ms > 0


def test_time_call_and_measure_latency_return_milliseconds(lenet, shape_task):
    assert isinstance(time_call(lambda: sum(range(100)), min_run_time=FAST), float)
    ms = measure_latency(lenet, shape_task.example_inputs(2), min_run_time=FAST)
    assert isinstance(ms, float) and ms > 0


def test_measure_config_fields_and_runtime_typo():
    with pytest.raises(RecipeError, match="did you mean 'eager'"):
        MeasureConfig(runtime="eagr")
    with pytest.raises(RecipeError, match=r"measure\.runtime: .*did you mean 'eager'"):
        Recipe.from_dict({"model": "zoo:lenet-5", "task": "shape:1x28x28", "measure": {"runtime": "eagr"}})
    with pytest.raises(RecipeError, match="split"):
        MeasureConfig(split="train")
    cfg = MeasureConfig()
    assert (cfg.split, cfg.runtime, cfg.latency) == ("test", "eager", True)
    cfg = MeasureConfig.from_dict({"split": "val", "runtime": "onnxruntime", "latency": False})
    assert MeasureConfig.from_dict(cfg.to_dict()) == cfg


def test_measure_metric_on_the_val_split(digits_task):
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")
    val = measure(model, digits_task, split="val", latency=False)["metric"]
    test = measure(model, digits_task, latency=False)["metric"]
    assert val["value"] == round(digits_task.evaluate(model, split="val"), 6)
    assert test["value"] == round(digits_task.evaluate(model, split="test"), 6)


def test_omp_wait_policy_is_passive_unless_chosen_or_torch_came_first():
    # a fresh interpreter importing torchslim first: PASSIVE is in the environment before torch loads
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, torchslim.runtime as r; print(os.environ['OMP_WAIT_POLICY'], r.omp_wait_policy())"
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["PASSIVE", "PASSIVE"]
    # this process imported torch (conftest) before torchslim: what torch loaded with is reported
    # (the user's setting, else OpenMP's "default"); the environment carries PASSIVE onwards
    assert omp_wait_policy() in ("default", os.environ["OMP_WAIT_POLICY"])


def test_macs_count_lstm_layers_by_hand():
    """oneDNN runs an LSTM layer as one kernel the counter did not know (MACs read 0): each
    step of each sequence multiplies by w_ih (4H x I) and w_hh (4H x H), per layer and direction."""
    from torchslim.measure import count_macs

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.LSTM(32, 32, batch_first=True)
            self.b = torch.nn.LSTM(16, 8, num_layers=2, bidirectional=True)

        def forward(self, x):                                   # x: (batch 3, steps 8, 32)
            return self.a(x)[0].sum() + self.b(x[..., :16].transpose(0, 1))[0].sum()

    steps_x_batch = 8 * 3
    a = steps_x_batch * (4 * 32 * 32 + 4 * 32 * 32)
    b = 2 * 2 * steps_x_batch * (4 * 8 * 16 + 4 * 8 * 8)     # 2 layers x 2 directions (layer 2 input 2x8)
    assert count_macs(Seq().eval(), (torch.randn(3, 8, 32),)) == a + b


def test_per_layer_rows_add_up_to_the_model_with_quantized_attention():
    """Regression (newcomer trial): a quantized attention's row also counted its out_proj."""
    from torchslim.layers.counting import count_params
    from torchslim.measure import layer_summary
    from torchslim.methods.quantize.linear import LinearQuantConfig

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    q = torchslim.apply(torch.nn.Sequential(layer), LinearQuantConfig(bits=8))
    rows = layer_summary(q)
    assert "0.self_attn" in {r["name"] for r in rows} and "0.self_attn.out_proj" in {r["name"] for r in rows}
    assert sum(r["params"] for r in rows) == count_params(q)[0]
