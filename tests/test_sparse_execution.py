"""Sparse execution: SparseLinear (CSR at inference) and the ``sparse`` runtime's measured choice."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim
from torchslim.edits import replace_module
from torchslim.layers import SparseLinear
from torchslim.measure import count_params, measure
from torchslim.prune import MagnitudePruneConfig
from torchslim.runtime import get_runtime

FAST = 0.005  # seconds per timing in the runtime's choice: enough for the fields, not for speed claims


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear_in_every_mode(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.9, 0.0)
    sparse = SparseLinear.from_linear(lin)
    x = torch.randn(3, 5, 96)                                          # (B, T, in): rows flattened
    want = lin(x)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), want.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse(x), want)                               # with gradients: the dense kernel
    with torch.no_grad():                                             # a changed weight is seen
        sparse.weight[0, 0] = 5.0
        torch.testing.assert_close(sparse(x)[..., 0], lin(x)[..., 0], atol=1e-5, rtol=1e-5)
    assert count_params(sparse) == count_params(lin)


def test_sparse_linear_saves_as_a_normal_artifact(tmp_path):
    torch.manual_seed(0)
    model = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), MagnitudePruneConfig(sparsity=0.95))
    replace_module(model, "1", SparseLinear.from_linear(model[1]))
    size = torchslim.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["edits"][-1]["class"].endswith("SparseLinear")
    assert manifest["tensors"]["1.weight"]["encoding"] == "relative-index"   # stored sparse, not as CSR
    back = torchslim.load(tmp_path / "m")
    assert isinstance(back[1], SparseLinear)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)
    assert size < 0.2 * torchslim.save(torchslim.build_model("zoo:lenet-300-100"), tmp_path / "dense")


def test_sparse_runtime_converts_only_what_it_measured_faster():
    torch.manual_seed(0)
    model = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"),
                            MagnitudePruneConfig(sparsity=0.98, scope="layer", ignore=("5",)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model.eval()(x)
    with get_runtime("sparse", margin=0.0, min_run_time=FAST, rounds=1) as rt:   # every candidate converts
        session = rt.prepare(model, (x[:1],))
        layers = session.details["sparse_layers"]
        assert set(layers) == {"1", "3"}                               # layer 5 is dense: not a candidate
        assert all(v["csr"] and v["sparsity"] == 0.98 and set(v["speedup"]) == {"1", "32"} for v in layers.values())
        assert session.fields == {"sparse_speedup": {k: v["speedup"] for k, v in layers.items()}}
        assert isinstance(session.model[1], SparseLinear) and type(session.model[5]) is nn.Linear
        torch.testing.assert_close(session(x), want, atol=1e-5, rtol=1e-5)
    assert type(model[1]) is nn.Linear                                 # the model itself is not changed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with get_runtime("sparse", margin=float("inf"), min_run_time=FAST, rounds=1) as rt:   # nothing is faster
        session = rt.prepare(model, (x[:1],))
        assert session.fields == {"sparse_speedup": "none"}
        assert not any(v["csr"] for v in session.details["sparse_layers"].values())
        assert not any(isinstance(m, SparseLinear) for m in session.model.modules())


def test_measure_row_says_what_the_sparse_runtime_chose():
    row = measure(torchslim.build_model("zoo:lenet-300-100"), "shape:1x28x28", batch_sizes=(1,), runtime="sparse",
                  min_run_time=FAST)
    # a dense model: nothing timed, nothing converted, no speed-up claimed
    assert row["runtime"]["name"] == "sparse"
    assert row["runtime"]["sparse_layers"] == {} and row["sparse_speedup"] == "none"
