"""Sensitivity analysis: per-layer curves measured for real, and ratios allocated from them."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.methods.prune import sensitivity
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.methods.prune.primitives import allocate_ratios, interpolate_curve


def test_curves_are_the_metric_of_each_layer_pruned_alone(trained_digits, digits_task):
    cfg = MagnitudePruneConfig(targets=("0", "6"))
    data = sensitivity.analyze(trained_digits, digits_task, cfg, points=(0.5, 0.95), split="val")
    assert data["baseline"] == pytest.approx(digits_task.evaluate(trained_digits, "val"))
    assert list(data["layers"]) == ["0", "6"]
    assert data["layers"]["6"]["params"] == trained_digits[6].weight.numel() + trained_digits[6].bias.numel()
    # one point recomputed independently: layer 6 alone at 95% of its weights
    alone = copy.deepcopy(trained_digits)
    w = alone[6].weight.data
    k = round(0.95 * w.numel())
    w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
    assert data["layers"]["6"]["points"][1] == [0.95, pytest.approx(digits_task.evaluate(alone, "val"))]
    # the input left unchanged
    assert not bool((trained_digits[6].weight == 0).any())
    # the first conv (288 weights feeding everything) hurts more at 95% than the wide hidden layer
    assert data["layers"]["0"]["points"][1][1] < data["layers"]["6"]["points"][1][1]


def test_written_json_reads_back_and_gives_ratios(tmp_path, trained_digits, digits_task):
    data = sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(targets=("0", "6")),
                               points=(0.5, 0.9), split="val")
    path = sensitivity.write(data, tmp_path)
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    back = sensitivity.load_curves(path)
    assert back == json.loads(json.dumps(data))
    ratios = sensitivity.ratios_from_curves(back, budget=0.5, cost="params", max_sparsity=0.9)
    removed = sum(ratios[n] * back["layers"][n]["params"] for n in ratios)
    assert removed == pytest.approx(0.5 * sum(back["layers"][n]["params"] for n in ratios), rel=1e-3)
    assert ratios["6"] > ratios["0"]


def test_allocation_prefers_the_insensitive_layer_and_meets_the_budget():
    curves = {"flat": [(0.0, 0.9), (0.5, 0.9), (0.9, 0.89)], "steep": [(0.0, 0.9), (0.5, 0.6), (0.9, 0.1)]}
    r = allocate_ratios(curves, {"flat": 300, "steep": 100}, baseline=0.9, budget=0.5, max_sparsity=0.9)
    assert r["flat"] * 300 + r["steep"] * 100 == pytest.approx(200, rel=1e-4)
    # one tolerance for both: ~0.004 of metric lets "flat" reach ~66%, "steep" under 1%
    assert r["flat"] > 0.6 and r["steep"] < 0.01
    assert 0.9 - interpolate_curve(curves["flat"], r["flat"]) <= 0.005
    assert interpolate_curve(curves["steep"], 0.7) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="cannot remove"):
        allocate_ratios(curves, {"flat": 300, "steep": 100}, baseline=0.9, budget=0.95, max_sparsity=0.9)


def _predicted(curves, r, baseline):
    return sum(max(0.0, baseline - interpolate_curve(curves[n], v)) for n, v in r.items())


def test_knapsack_allocation_weighs_each_cut_by_what_it_removes():
    # "wide" removes 4x the cost of "narrow" per unit of sparsity and is a little more sensitive:
    # equal_drop (same drop for both) cuts them alike; the knapsack cuts "wide", the cheaper drop per
    # unit of budget, and predicts less loss for the same budget
    curves = {"wide": [(0.0, 0.9), (0.9, 0.81)], "narrow": [(0.0, 0.9), (0.9, 0.84)]}
    costs = {"wide": 400, "narrow": 100}
    eq = allocate_ratios(curves, costs, baseline=0.9, budget=0.4, max_sparsity=0.9)
    ks = allocate_ratios(curves, costs, baseline=0.9, budget=0.4, max_sparsity=0.9, allocation="knapsack")
    for r in (eq, ks):  # both meet the budget: 40% of 500
        assert r["wide"] * 400 + r["narrow"] * 100 == pytest.approx(200, rel=1e-3)
    assert ks == {"wide": 0.5, "narrow": 0.0}
    # the knapsack's loss: 0.5 * 0.09 / 0.9 = 0.05; equal_drop's: both at drop t, 0.9t/0.09 * 400 + 0.9t/0.06 *
    # 100 = 200 -> t = 0.037 each
    assert _predicted(curves, ks, 0.9) == pytest.approx(0.05, abs=1e-4)
    assert _predicted(curves, eq, 0.9) == pytest.approx(2 * 0.2 / 5.5556, abs=1e-3)
    assert _predicted(curves, ks, 0.9) < _predicted(curves, eq, 0.9)
    # a curve that dips and recovers is not trusted past the dip; a layer at -inf (a failed point) stops there
    dip = {"a": [(0.0, 1.0), (0.3, 0.5), (0.9, 1.0)], "b": [(0.0, 1.0), (0.5, 0.95), (0.6, -math.inf)]}
    r = allocate_ratios(dip, {"a": 100, "b": 100}, 1.0, 0.25, max_sparsity=0.9, allocation="knapsack")
    assert r["b"] == pytest.approx(0.5, abs=0.01) and r["a"] == pytest.approx(0.0, abs=0.01)
    with pytest.raises(ValueError, match="allocation must be one of"):
        allocate_ratios(curves, costs, baseline=0.9, budget=0.4, allocation="greedy")


def test_bad_points_and_nm_are_refused(trained_digits, digits_task):
    with pytest.raises(RecipeError, match=r"points must be sparsities in \(0, 1\)"):
        sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(), points=(0.5, 1.0))
    with pytest.raises(RecipeError, match="N:M"):
        sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(granularity="2:4"), points=(0.5,))


def test_cli_bad_points_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchslim.cli", "sensitivity", "zoo:digits-cnn", "--task", "digits",
                        "--out", str(tmp_path), "--points", "0.5,1.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "sparsities in (0, 1)" in r.stderr and "Traceback" not in r.stderr


def _sparsity(model, names):
    ws = [model.get_submodule(n).weight for n in names]
    return [float((w == 0).float().mean()) for w in ws], sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def test_ratios_sensitivity_meets_the_budget_and_beats_uniform(tmp_path, trained_digits, digits_task):
    layers = ("0", "2", "6", "9")
    data = sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(), split="val")
    path = sensitivity.write(data, tmp_path)
    cfg = MagnitudePruneConfig(sparsity=0.85, ratios="sensitivity", sensitivity=str(path))
    planned = torchslim.apply(trained_digits, cfg, task=digits_task)
    want = sensitivity.ratios_from_curves(data, 0.85, "params")
    per_layer, removed, total = _sparsity(planned, layers)
    assert per_layer == pytest.approx([want[n] for n in layers], abs=1e-3)
    assert removed == pytest.approx(0.85 * total, rel=2e-3)
    uniform = torchslim.apply(trained_digits, MagnitudePruneConfig(sparsity=0.85, scope="layer"), task=digits_task)
    assert _sparsity(uniform, layers)[1] == pytest.approx(removed, rel=2e-3)
    acc_plan, acc_uniform = digits_task.evaluate(planned), digits_task.evaluate(uniform)
    assert acc_plan >= acc_uniform, (acc_plan, acc_uniform)


def test_ratios_sensitivity_measured_in_the_step_are_recorded(trained_digits, digits_task):
    from torchslim.session import Session
    from torchslim.methods.prune.dispatch import run_prune

    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(sparsity=0.7, ratios="sensitivity")
    model = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    row = session.info["metrics"]
    assert set(row["sensitivity"]["layers"]) == {"0", "2", "6", "9"} and row["sensitivity"]["split"] == "val"
    ratios = row["sensitivity_ratios"]
    got = {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in ratios}
    assert got == pytest.approx(ratios, abs=1e-3)


def test_ratios_sensitivity_bad_input(tmp_path, trained_digits, digits_task):
    with pytest.raises(RecipeError, match="granularity weight, channel and head, not 'layer'"):
        MagnitudePruneConfig(ratios="sensitivity", granularity="layer")
    with pytest.raises(RecipeError, match="ratios: sensitivity only"):
        MagnitudePruneConfig(sensitivity="x.json")
    with pytest.raises(RecipeError, match="budget: macs is read with ratios: sensitivity or netadapt only"):
        MagnitudePruneConfig(budget="macs")
    with pytest.raises(RecipeError, match="budget: macs needs granularity channel or head"):
        MagnitudePruneConfig(budget="macs", ratios="sensitivity")
    with pytest.raises(RecipeError, match="allocation: knapsack is read with ratios: sensitivity only"):
        MagnitudePruneConfig(allocation="knapsack")
    with pytest.raises(RecipeError, match="allocation"):
        MagnitudePruneConfig(ratios="sensitivity", allocation="greedy")
    with pytest.raises(RecipeError, match="granularity layer drops a layer whole"):
        sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(granularity="layer"), points=(0.5,))
    (tmp_path / "bad.json").write_text("{}")
    from torchslim.errors import UserError
    with pytest.raises(UserError, match="not a torchslim sensitivity file"):
        MagnitudePruneConfig(ratios="sensitivity", sensitivity=str(tmp_path / "bad.json")).check_ready(digits_task)


def test_curves_of_another_granularity_or_model_are_refused_or_flagged(tmp_path, trained_digits, digits_task):
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session

    data = sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(targets=("0", "2", "6", "9")),
                               points=(0.5, 0.9), split="val")
    path = sensitivity.write({**data, "granularity": "channel"}, tmp_path / "channel")
    with pytest.raises(RecipeError, match="holds 'channel' curves"):
        run_prune(copy.deepcopy(trained_digits), MagnitudePruneConfig(sparsity=0.5, ratios="sensitivity",
                                                                      sensitivity=str(path)),
                  Session(task=digits_task), "magnitude")
    # curves of the model before training, applied to the trained one: said in the row
    path = sensitivity.write({**data, "baseline": 0.1}, tmp_path / "untrained")
    session = Session(task=digits_task)
    run_prune(copy.deepcopy(trained_digits), MagnitudePruneConfig(sparsity=0.5, ratios="sensitivity",
                                                                  sensitivity=str(path)), session, "magnitude")
    assert [w["code"] for w in session.warnings] == ["sensitivity_mismatch"]
    # curves naming layers this model does not have: refused at preflight, before the baseline trains
    other = sensitivity.write({**data, "layers": {f"features.{k}": v for k, v in data["layers"].items()}},
                              tmp_path / "other")
    from torchslim.pipeline import preflight
    from torchslim.recipe import Recipe
    recipe = Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits", "train": {"epochs": 5},
                               "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5, "ratios": "sensitivity",
                                                    "sensitivity": str(other)}}]})
    with pytest.raises(RecipeError, match=r"curves for 4 layer\(s\) this model does not have \(features.0, "
                                          r".*another model"):
        preflight(recipe)


def test_cli_warns_when_the_model_is_at_chance(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchslim.cli", "sensitivity", "zoo:digits-cnn", "--task", "digits",
                        "--out", str(tmp_path), "--points", "0.5", "--targets", "9"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "about chance" in r.stderr and (tmp_path / "sensitivity.json").is_file()


@pytest.fixture(scope="module")
def channel_curves(trained_digits, digits_task):
    return sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(granularity="channel"),
                               points=(0.25, 0.5, 0.75), split="val")


def test_channel_curves_per_group_with_measured_removal(channel_curves, trained_digits, digits_task):
    from torchslim.measure import count_macs, count_params

    data = channel_curves
    # one curve per channel group (by root); the classifier "9" holds the model's output: kept
    assert set(data["layers"]) == {"0", "2", "6"}
    x = digits_task.example_inputs(1)
    assert data["model"] == {"params": count_params(trained_digits)[0], "macs": count_macs(trained_digits, x)}
    # conv "0" (1 -> 32, 3x3 on 8x8) at 50%: 16 of its filters and 16 input slices of conv "2" (32 -> 64)
    p, removed_params, removed_macs = data["layers"]["0"]["removed"][1]
    assert p == 0.5 and removed_params == 16 * (9 + 1) + 64 * 16 * 9
    assert removed_macs == 16 * 9 * 64 + 64 * 16 * 9 * 64
    for row in data["layers"].values():  # more sparsity never removes less
        assert [r[2] for r in row["removed"]] == sorted(r[2] for r in row["removed"])


def test_ratios_sensitivity_for_channels_meets_the_measured_macs_budget(tmp_path, channel_curves, trained_digits,
                                                                       digits_task):
    from torchslim.measure import count_macs
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session

    path = sensitivity.write(channel_curves, tmp_path)
    x = digits_task.example_inputs(1)
    dense = count_macs(trained_digits, x)
    uniform = torchslim.apply(trained_digits, MagnitudePruneConfig(granularity="channel", sparsity=0.5,
                                                                   scope="layer"), task=digits_task)
    target = 1 - count_macs(uniform, x) / dense
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=target, budget="macs", ratios="sensitivity",
                               sensitivity=str(path))
    planned = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    got = 1 - count_macs(planned, x) / dense
    budget = session.info["metrics"]["sensitivity_budget"]
    assert got == pytest.approx(target, abs=0.005) and budget["measured"] == pytest.approx(got, abs=1e-6)
    ratios = session.info["metrics"]["sensitivity_ratios"]
    for name, r in ratios.items():   # each group lost its own fraction of its channels
        layer = planned.get_submodule(name)
        kept = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
        orig = trained_digits.get_submodule(name)
        orig = orig.out_channels if hasattr(orig, "out_channels") else orig.out_features
        assert kept == max(math.floor((1 - r) * orig + 1e-9), 1)   # at least r of them went
    assert len(set(ratios.values())) > 1                       # not the uniform plan
    assert digits_task.evaluate(planned, "val") >= digits_task.evaluate(uniform, "val")
    # the knapsack allocation: another plan from the same curves, the same measured budget
    session = Session(task=digits_task)
    knapsack = run_prune(copy.deepcopy(trained_digits), MagnitudePruneConfig(
        granularity="channel", sparsity=target, budget="macs", ratios="sensitivity", sensitivity=str(path),
        allocation="knapsack"), session, "magnitude")
    assert 1 - count_macs(knapsack, x) / dense == pytest.approx(target, abs=0.005)
    assert set(session.info["metrics"]["sensitivity_ratios"]) == set(ratios)
    assert session.info["metrics"]["sensitivity_ratios"] != ratios


def test_ratios_sensitivity_reaches_a_budget_the_summed_curves_overcount(tmp_path, digits_task):
    """A residual network at 70% of every group: coupled cuts overlap so much that the curves' summed
    removal passes 100% before the measured one reaches the target; the plan's budget goes past 1."""
    from torchslim.measure import count_macs
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session
    from torchslim.train import TrainConfig, train

    torch.manual_seed(0)
    model = torchslim.build_model("zoo:resnet-fmnist")   # 1-channel input, adaptive pool: runs on 8x8 digits
    train(model, digits_task, TrainConfig(epochs=1, lr=0.05, loggers=()))
    data = sensitivity.analyze(model, digits_task, MagnitudePruneConfig(granularity="channel"), points=(0.5, 0.9),
                               split="val")
    path = sensitivity.write(data, tmp_path)
    x = digits_task.example_inputs(1)
    dense = count_macs(model, x)
    uniform = torchslim.apply(model, MagnitudePruneConfig(granularity="channel", sparsity=0.7, scope="layer"),
                              task=digits_task)
    target = 1 - count_macs(uniform, x) / dense
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=target, budget="macs", ratios="sensitivity",
                               sensitivity=str(path))
    planned = run_prune(copy.deepcopy(model), cfg, session, "magnitude")
    assert 1 - count_macs(planned, x) / dense == pytest.approx(target, abs=0.005)
    assert session.info["metrics"]["sensitivity_budget"]["planned"] > 1.0
    assert not [w for w in session.warnings if w["code"] == "sensitivity_budget"]


def test_curves_with_a_short_finetune_per_cut_measure_recovery(trained_digits, digits_task):
    """finetune_steps: each cut trained N seeded SGD steps before it is evaluated (NetAdapt)."""
    from torchslim.session import Session
    from torchslim.train.trainer import short_finetune
    cfg = MagnitudePruneConfig(targets=("0",))
    oneshot = sensitivity.analyze(trained_digits, digits_task, cfg, points=(0.9,), split="val")
    tuned = sensitivity.analyze(trained_digits, digits_task, cfg, points=(0.9,), split="val", finetune_steps=30,
                                finetune_lr=0.02)
    assert oneshot["finetune_steps"] == 0 and "finetune" not in oneshot
    assert tuned["finetune_steps"] == 30 and tuned["finetune"]["lr"] == 0.02
    # the point recomputed by hand: prune, re-estimate BatchNorm, 30 steps, evaluate
    alone = copy.deepcopy(trained_digits)
    w = alone[0].weight.data
    w.view(-1)[w.abs().view(-1).argsort()[:round(0.9 * w.numel())]] = 0.0
    Session(task=digits_task).recalibrate_batchnorm(alone, 512)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    short_finetune(alone, digits_task, 30, lr=0.02)
    assert torch.equal(torch.get_rng_state(), state)        # the caller's random state untouched
    assert not alone.training and all(p.grad is None for p in alone.parameters())
    # the pruned weights stayed pruned through the steps (the point is the layer at 90%)
    assert float((alone[0].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)
    assert float((alone[2].weight == 0).float().mean()) == 0.0
    with pytest.raises(ValueError, match="schedule must be cosine or constant"):
        short_finetune(alone, digits_task, 3, schedule="linear")
    assert tuned["layers"]["0"]["points"][0] == [0.9, pytest.approx(digits_task.evaluate(alone, "val"))]
    # training recovers what the cut took (the first conv at 90% is the digits CNN's worst cut)
    assert tuned["layers"]["0"]["points"][0][1] > oneshot["layers"]["0"]["points"][0][1] + 0.01
    assert not bool((trained_digits[0].weight == 0).any())   # the input untouched
    with pytest.raises(RecipeError, match="finetune_steps must be >= 0"):
        sensitivity.analyze(trained_digits, digits_task, cfg, points=(0.5,), finetune_steps=-1)


def test_sensitivity_steps_in_a_step_and_its_bad_input(tmp_path, trained_digits, digits_task):
    from torchslim.session import Session
    from torchslim.methods.prune.dispatch import run_prune
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(sparsity=0.7, ratios="sensitivity", sensitivity_steps=5, sensitivity_lr=0.005,
                               targets=("0", "6"))
    run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    assert session.info["metrics"]["sensitivity"]["finetune_steps"] == 5
    assert session.info["metrics"]["sensitivity"]["finetune"] == {"lr": 0.005, "batch_size": 64, "momentum": 0.9,
                                                                   "schedule": "cosine"}
    with pytest.raises(RecipeError, match="sensitivity_steps: read with ratios: sensitivity or netadapt only"):
        MagnitudePruneConfig(sensitivity_steps=5)
    with pytest.raises(RecipeError, match="measured already"):
        MagnitudePruneConfig(ratios="sensitivity", sensitivity="x.json", sensitivity_steps=5)
    r = subprocess.run([sys.executable, "-m", "torchslim.cli", "sensitivity", "zoo:digits-cnn", "--task", "digits",
                        "--out", str(tmp_path), "--finetune-steps", "-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "integer >= 0" in r.stderr and "Traceback" not in r.stderr


# -- budget: latency ------------------------------------------------------------------------------
def _two_group_curves(latency_a, latency_b):
    """Curves of two channel groups: ``a`` loses accuracy fast, ``b`` slowly; the fourth value of
    each ``removed`` row (milliseconds) is given, the MACs column is the same for both."""
    pts = (0.25, 0.5, 0.75)
    rows = {}
    for name, drops, lat in (("a", (0.02, 0.1, 0.3), latency_a), ("b", (0.0, 0.01, 0.05), latency_b)):
        rows[name] = {"params": 100, "weights": 90, "macs": 1000,
                      "points": [[p, 0.9 - d] for p, d in zip(pts, drops)],
                      "removed": [[p, 100 * p, 1000 * p, t] for p, t in zip(pts, lat)]}
    return {"schema": 1, "granularity": "channel", "baseline": 0.9, "layers": rows,
            "model": {"params": 200, "macs": 2000, "latency_ms": 10.0},
            "latency": {"batch_size": 1, "runtime": "eager", "threads": 1}}


def test_latency_budget_reads_the_timed_column_and_holds_it_monotone():
    # timed removal proportional to the MACs removed: the same plan as a MACs budget
    data = _two_group_curves((1.25, 2.5, 3.75), (1.25, 2.5, 3.75))
    assert sensitivity.ratios_from_curves(data, 0.3, "latency") == sensitivity.ratios_from_curves(data, 0.3, "macs")
    # a deeper cut measured as removing less (noise) counts as much as the smaller cut before it
    noisy = _two_group_curves((1.25, 2.5, 3.75), (2.0, 1.5, 4.0))
    held = _two_group_curves((1.25, 2.5, 3.75), (2.0, 2.0, 4.0))
    for budget in (0.15, 0.3, 0.5):
        assert sensitivity.ratios_from_curves(noisy, budget, "latency") == \
            sensitivity.ratios_from_curves(held, budget, "latency")
    # points in any order (torchslim sensitivity --points 0.75,0.5,0.25): the same plan
    shuffled = _two_group_curves((1.25, 2.5, 3.75), (2.0, 1.5, 4.0))
    for row in shuffled["layers"].values():
        row["points"], row["removed"] = row["points"][::-1], row["removed"][::-1]
    for cost in ("latency", "macs"):
        assert sensitivity.ratios_from_curves(shuffled, 0.3, cost) == sensitivity.ratios_from_curves(noisy, 0.3, cost)
    # group b is the cheap one in time as well as in accuracy: the plan cuts it deeper
    ratios = sensitivity.ratios_from_curves(held, 0.3, "latency")
    assert ratios["b"] > ratios["a"]
    # curves measured without timing cannot plan a latency budget
    untimed = _two_group_curves((1, 2, 3), (1, 2, 3))
    del untimed["model"]["latency_ms"]
    for row in untimed["layers"].values():
        row["removed"] = [r[:3] for r in row["removed"]]
    with pytest.raises(RecipeError, match="hold no latency"):
        sensitivity.ratios_from_curves(untimed, 0.3, "latency")


def test_channel_curves_timed_for_a_latency_budget(tmp_path, trained_digits, digits_task):
    from torchslim.measure import count_macs
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session

    data = sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(granularity="channel"),
                               points=(0.25, 0.75), split="val", latency=(4, "eager"))
    assert data["latency"] == {"batch_size": 4, "runtime": "eager", "threads": torch.get_num_threads()}
    assert data["model"]["latency_ms"] > 0
    for row in data["layers"].values():   # sparsity, params, MACs and milliseconds removed per point
        assert [len(r) for r in row["removed"]] == [4, 4]
        assert all(math.isfinite(r[3]) for r in row["removed"])
    path = sensitivity.write(data, tmp_path)
    x = digits_task.example_inputs(1)
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=0.4, ratios="sensitivity", budget="latency",
                               latency_batch_size=4, sensitivity=str(path))
    planned = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    budget = session.info["metrics"]["sensitivity_budget"]
    timed = budget["latency"]
    assert budget["cost"] == "latency" and budget["target"] == 0.4
    assert timed["batch_size"] == 4 and timed["runtime"] == "eager" and timed["dense_ms"] > 0
    assert timed["planned_ms"] == pytest.approx(timed["dense_ms"] * (1 - budget["measured"]), rel=1e-3)
    assert count_macs(planned, x) < count_macs(trained_digits, x)   # channels really went
    # the same file for a budget timed at another batch size: planned, and flagged
    session = Session(task=digits_task)
    run_prune(copy.deepcopy(trained_digits), dataclasses.replace(cfg, latency_batch_size=8), session, "magnitude")
    assert any("timed at batch 4" in w["message"] for w in session.warnings)
    # a MACs file cannot plan for time
    untimed = sensitivity.write(sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(
        granularity="channel"), points=(0.5,), split="val"), tmp_path / "untimed")
    with pytest.raises(RecipeError, match="hold no latency"):
        run_prune(copy.deepcopy(trained_digits), dataclasses.replace(cfg, sensitivity=str(untimed)),
                  Session(task=digits_task), "magnitude")
    with pytest.raises(RecipeError, match="were not timed"):   # and a recipe says so at preflight
        dataclasses.replace(cfg, sensitivity=str(untimed)).check_ready(digits_task)
    cfg.check_ready(digits_task)


@pytest.mark.parametrize("fields, match", [
    ({"granularity": "weight", "ratios": "sensitivity", "budget": "latency"}, "latency needs granularity"),
    ({"granularity": "channel", "ratios": "sensitivity", "latency_batch_size": 16}, "read with budget: latency"),
    ({"granularity": "channel", "ratios": "sensitivity", "budget": "latency", "latency_runtime": "nope"},
     "unknown runtime"),
    ({"granularity": "channel", "budget": "latency"}, "read with ratios: sensitivity or netadapt"),
])
def test_latency_budget_bad_input(fields, match):
    with pytest.raises(RecipeError, match=match):
        MagnitudePruneConfig.from_dict(fields, where="prune.magnitude")


@pytest.mark.parametrize("extra, match", [
    (["--latency-batch-size", "4"], "latency is measured for granularity channel"),
    (["--granularity", "channel", "--latency-runtime", "onnxruntime"], "read with --latency-batch-size"),
    (["--granularity", "channel", "--latency-batch-size", "4", "--latency-runtime", "compile"],
     "compile cannot time"),
    (["--granularity", "channel", "--latency-batch-size", "4", "--latency-runtime", "eagr"], "unknown runtime"),
])
def test_cli_latency_curves_bad_input(tmp_path, capsys, extra, match):
    from torchslim.cli import main
    code = main(["sensitivity", "zoo:digits-cnn", "--task", "digits", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and match in err, err
    assert not (tmp_path / "sensitivity.json").exists()


def test_latency_budget_plans_on_the_timed_cost(tmp_path, trained_digits, digits_task, fake_latency):
    """On a clock with a fixed overhead (conftest ``fake_latency``) a latency plan must remove more
    MACs than a MACs plan of the same fraction, and reach its budget on that clock."""
    from torchslim.measure import count_macs
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session

    x = digits_task.example_inputs(1)

    def clock(m):
        return 1.0 + count_macs(m, x) / 1e6

    data = sensitivity.analyze(trained_digits, digits_task, MagnitudePruneConfig(granularity="channel"),
                               points=(0.25, 0.5, 0.75), split="val", latency=(2, "eager"))
    assert data["model"]["latency_ms"] == pytest.approx(2 * clock(trained_digits))
    for row in data["layers"].values():   # on this clock, the ms a cut removes is 2 ms per million MACs
        for _, _, macs, ms in row["removed"]:
            assert ms == pytest.approx(2 * macs / 1e6, rel=1e-6, abs=1e-9)
    path = sensitivity.write(data, tmp_path)
    plans = {}
    for budget in ("macs", "latency"):
        session = Session(task=digits_task)
        fields = {"latency_batch_size": 2} if budget == "latency" else {}
        planned = run_prune(copy.deepcopy(trained_digits), MagnitudePruneConfig(
            granularity="channel", sparsity=0.3, ratios="sensitivity", budget=budget, sensitivity=str(path),
            **fields), session, "magnitude")
        plans[budget] = (planned, session.info["metrics"]["sensitivity_budget"], session.warnings)
    planned, record, warnings = plans["latency"]
    removed = 1 - clock(planned) / clock(trained_digits)
    assert removed == pytest.approx(0.3, abs=0.02) and not warnings
    assert record["measured"] == pytest.approx(removed, abs=1e-6)
    assert record["latency"]["planned_ms"] == pytest.approx(2 * clock(planned), rel=1e-6)
    assert count_macs(planned, x) < count_macs(plans["macs"][0], x)   # more MACs go for the same fraction
