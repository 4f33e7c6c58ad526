"""Low-rank factorization: the Eckart-Young bound, rank choice, Tucker and CP on real convolutions,
bad ranks, the spectra record, and reload of every factorized layer."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import RecipeError, UserError
from torchslim.factorize import (CPConv2d, CPFactorizeConfig, LowRankLinear, SVDFactorizeConfig, TuckerConv2d,
                                 TuckerFactorizeConfig)
from torchslim.measure import count_macs, count_params
from torchslim.methods.factorize import primitives as P
from torchslim.methods.factorize.svd import _factorize_svd
from torchslim.pipeline import StepContext


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchslim.build_model("torchvision:resnet18").eval()


@pytest.fixture
def fc(resnet18) -> nn.Linear:
    """resnet18's classifier (1000 x 512) with a decaying spectrum, as trained layers have."""
    fc = copy.deepcopy(resnet18.fc)
    with torch.no_grad():
        fc.weight.mul_(torch.logspace(0, -2, 512)[None, :])
    return fc


@pytest.mark.parametrize("rank", [1, 16, 200])
def test_svd_error_is_the_eckart_young_bound(rank, fc):
    low = torchslim.apply(nn.Sequential(fc), SVDFactorizeConfig(rank=rank))[0]
    assert isinstance(low, LowRankLinear) and low.first.weight.shape == (rank, 512)
    approx = (low.second.weight @ low.first.weight).detach().double()
    s = np.linalg.svd(fc.weight.detach().double().numpy(), compute_uv=False)    # independent reference
    bound = float(np.sqrt((s[rank:] ** 2).sum()))
    err = float(torch.linalg.norm(fc.weight.detach().double() - approx))
    assert err == pytest.approx(bound, rel=1e-4), (err, bound)
    torch.testing.assert_close(low.second.bias, fc.bias, rtol=0, atol=0)


def test_energy_rank_is_the_smallest_keeping_the_fraction(fc):
    low = torchslim.apply(nn.Sequential(fc), SVDFactorizeConfig(rank=0.8))[0]
    e = np.linalg.svd(fc.weight.detach().double().numpy(), compute_uv=False) ** 2
    kept = np.cumsum(e) / e.sum()
    assert kept[low.rank - 1] >= 0.8 > kept[low.rank - 2]


def test_global_budget_keeps_the_weight_fraction_and_favours_steep_spectra():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(0, -3, 256)[None, :])   # steep: a few directions matter
    out = torchslim.apply(model, SVDFactorizeConfig(budget=0.25))
    factor_weights = sum(m.rank * 512 for m in out if isinstance(m, LowRankLinear))
    assert factor_weights <= 0.25 * 2 * 256 * 256
    assert out[0].rank < out[2].rank            # the flat (random) spectrum needs more rank


def test_rank_above_the_layer_limit_names_layer_and_max_rank():
    model = torchslim.build_model("zoo:lenet-300-100")
    with pytest.raises(RecipeError, match=r"5 \(max rank 10\)"):                # named exactly: refused
        torchslim.apply(model, SVDFactorizeConfig(rank=32, targets=("1", "5")))
    ctx = StepContext()
    config = SVDFactorizeConfig(rank=32)
    config.check_model(model)                                                   # picked by re:.*: no error
    out = _factorize_svd(copy.deepcopy(model), config, ctx)
    assert [type(out[i]).__name__ for i in (1, 3, 5)] == ["LowRankLinear", "LowRankLinear", "Linear"]
    assert [w["code"] for w in ctx.warnings] == ["no_gain"] and "5 (rank 32 of 100->10)" in ctx.warnings[0]["message"]
    with pytest.raises(RecipeError, match="neither an integer rank nor a fraction"):
        SVDFactorizeConfig(rank=1.5)
    with pytest.raises(RecipeError, match="1.0 is ambiguous: write 1 for rank one"):
        SVDFactorizeConfig(rank=1.0)
    with pytest.raises(RecipeError, match="not both"):
        SVDFactorizeConfig(rank=4, budget=0.5)


def test_rank_without_gain_leaves_the_layer_dense_with_a_warning():
    model = torchslim.build_model("zoo:lenet-300-100")
    session = StepContext()
    out = _factorize_svd(copy.deepcopy(model), SVDFactorizeConfig(rank=9), session)
    # 100 -> 10 at rank 9 holds 990 weights instead of 1000: smaller; 300 -> 100 at 9: smaller too
    assert isinstance(out[5], LowRankLinear) and not session.warnings
    out = _factorize_svd(copy.deepcopy(model), SVDFactorizeConfig(rank=0.999), session)
    assert isinstance(out[5], nn.Linear) and session.warnings[-1]["code"] == "no_gain"
    assert "5 (rank" in session.warnings[-1]["message"]


def test_spectra_and_ranks_are_recorded_for_the_report():
    model = torchslim.build_model("zoo:lenet-300-100")
    session = StepContext()
    _factorize_svd(copy.deepcopy(model), SVDFactorizeConfig(rank=8), session)
    metrics = session.info["metrics"]
    assert metrics["ranks"] == {"1": 8, "3": 8, "5": 8}
    s = torch.linalg.svdvals(model[3].weight.detach().double())
    expected = (s / s[0]).tolist()                  # all 100 (the first 256 are kept)
    assert metrics["spectra"]["3"] == pytest.approx(expected, abs=1e-5) and len(metrics["spectra"]["3"]) == 100


def test_tucker_on_a_real_conv_shrinks_and_error_falls_with_rank(resnet18):
    conv = resnet18.layer2[0].conv2                                              # 128 x 128 x 3 x 3
    x = torch.randn(2, 128, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = conv(x)
    errors = []
    for rank in (8, 32, 96):
        t = torchslim.apply(nn.Sequential(conv), TuckerFactorizeConfig(rank=rank, targets=("0",)))[0]
        assert isinstance(t, TuckerConv2d) and (t.rank_out, t.rank_in) == (rank, rank)
        assert count_params(t)[0] < conv.weight.numel()
        with torch.no_grad():
            errors.append(float((t(x) - y0).norm() / y0.norm()))
    assert errors[0] > errors[1] > errors[2], errors


def test_tucker_and_cp_recover_kernels_of_that_rank_exactly():
    """A kernel built with multilinear rank (4, 3) or CP rank 3 is reproduced by its decomposition."""
    g = torch.Generator().manual_seed(0)
    core = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    u_out, u_in = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                                   dtype=torch.float64)
    w = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    c, a, b = P.tucker2(w, 4, 3)
    assert float(torch.linalg.norm(torch.einsum("abhw,oa,ib->oihw", c, a, b) - w) / torch.linalg.norm(w)) < 1e-10
    fa, fb, fc, fd = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (12, 8, 3, 3))
    w = torch.einsum("or,ir,hr,wr->oihw", fa, fb, fc, fd)
    a, b, c, d = P.cp(w, 3, iterations=200)
    assert float(torch.linalg.norm(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d) - w) / torch.linalg.norm(w)) < 1e-4


def test_every_factorized_layer_reloads_identically_and_macs_fall(tmp_path, digits_task):
    model = torchslim.build_model("zoo:digits-cnn").eval()     # conv 0, conv 2, Linear 6, Linear 9
    x = digits_task.example_inputs(4)[0]
    out = torchslim.apply(model, SVDFactorizeConfig(rank=16, targets=("6",)))
    out = torchslim.apply(out, TuckerFactorizeConfig(rank=8, targets=("2",)))
    out = torchslim.apply(out, CPFactorizeConfig(rank=6, targets=("0",))).eval()
    assert [type(out[i]) for i in (0, 2, 6)] == [CPConv2d, TuckerConv2d, LowRankLinear]
    assert count_macs(out, (x,)) < count_macs(model, (x,))
    assert count_params(out)[0] < count_params(model)[0]
    torchslim.save(out, tmp_path / "a")
    back = torchslim.load(tmp_path / "a")
    assert [type(back[i]) for i in (0, 2, 6)] == [CPConv2d, TuckerConv2d, LowRankLinear]
    with torch.no_grad():
        torch.testing.assert_close(back(x), out(x), rtol=0, atol=0)


def test_conv_methods_refuse_grouped_convs_and_need_tensorly(monkeypatch):
    model = torchslim.build_model("torchvision:mobilenet_v2")
    with pytest.raises(RecipeError, match="grouped convolution"):
        TuckerFactorizeConfig(rank=4, targets=("features.1.conv.0.0",)).check_targets(model)
    monkeypatch.setitem(sys.modules, "tensorly", None)      # as if not installed
    with pytest.raises(UserError, match=r"torchslim\[lowrank\]"):
        CPFactorizeConfig(rank=4).check_ready()
    SVDFactorizeConfig(rank=4).check_ready()                 # SVD needs torch only


def test_recipe_records_spectra_and_the_report_plots_them(tmp_path):
    """fold and factorize steps in one recipe: the row carries ranks and spectra, the report draws
    spectra.png and keeps the spectra out of the step-details table, the final model reloads."""
    recipe = {"model": "zoo:digits-cnn", "task": "shape:1x8x8", "measure": {"latency": False},
              "steps": [{"fold": {"method": "identity"}},
                        {"factorize": {"method": "svd", "rank": 8, "targets": ["6", "8"]}}]}  # 8: the Dropout until step 1
    metrics = torchslim.compress(recipe, tmp_path / "run")
    step = metrics["steps"][-1]
    assert step["ranks"] == {"6": 8, "8": 8}            # Dropout 8 deleted: the last Linear renumbered
    assert len(step["spectra"]["6"]) == 128 and step["spectra"]["6"][0] == 1.0   # 1024 -> 128
    assert metrics["steps"][1]["folded"] == ["8"]
    assert step["macs"] < metrics["steps"][0]["macs"]
    assert (tmp_path / "run" / "plots" / "spectra.png").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "ranks: " in report and "spectra: " not in report and "plots/spectra.png" in report
    back = torchslim.load(tmp_path / "run" / "model")
    assert isinstance(back[6], LowRankLinear) and isinstance(back[8], LowRankLinear) and len(back) == 9


def test_finetune_recovers_accuracy_after_a_harsh_rank(trained_digits, digits_task):
    from torchslim.train import TrainConfig

    cut = SVDFactorizeConfig(rank=2, targets=("6",))
    torch.manual_seed(0)
    plain = torchslim.apply(trained_digits, cut)
    tuned = torchslim.apply(trained_digits, SVDFactorizeConfig(
        rank=2, targets=("6",), finetune=TrainConfig(optimizer="adamw", epochs=1, lr=0.003, loggers=())),
        task=digits_task)
    assert isinstance(tuned[6], LowRankLinear) and tuned[6].rank == 2
    before, after = digits_task.evaluate(plain), digits_task.evaluate(tuned)
    assert after > before + 0.02, (before, after)
