"""ratios: netadapt: per-group channel ratios found by rounds of measured single-group cuts."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.measure import count_macs
from torchslim.methods.prune.adapt import netadapt_ratios
from torchslim.methods.prune.dispatch import run_prune
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.methods.prune.threshold import ThresholdPruneConfig
from torchslim.session import Session


def _cut(model, group, remove, task):
    n = model.get_submodule(group).out_channels if hasattr(model.get_submodule(group), "out_channels") \
        else model.get_submodule(group).out_features
    return torchslim.apply(model, MagnitudePruneConfig(granularity="channel", targets=(group,), sparsity=remove / n,
                                                       scope="layer"), task=task)


def test_one_round_picks_the_best_cut_that_meets_the_target(trained_digits, digits_task):
    """One round, no fine-tune: every group's smallest cut meeting 80% of the MACs is found here
    independently, and NetAdapt must choose the one scoring best on val."""
    x = digits_task.example_inputs(1)
    dense = count_macs(trained_digits, x)
    before = copy.deepcopy(trained_digits.state_dict())
    ratios, history = netadapt_ratios(trained_digits, digits_task, MagnitudePruneConfig(granularity="channel"),
                                      method="prune.magnitude", budget=0.2, rounds=1, steps=0)
    assert all(torch.equal(v, trained_digits.state_dict()[k]) for k, v in before.items())  # input unchanged
    scores = {}
    for group, n in (("0", 32), ("2", 64), ("6", 128)):
        for remove in range(1, n):   # the fewest channels whose removal leaves <= 80% of the MACs
            cand = _cut(trained_digits, group, remove, digits_task)
            if count_macs(cand, x) <= 0.8 * dense:
                scores[group] = (digits_task.evaluate(cand, "val"), remove)
                break
    best = max(scores, key=lambda g: scores[g][0])
    assert len(history) == 1 and history[0]["group"] == best
    assert history[0]["removed"] == scores[best][1] and history[0]["metric"] == pytest.approx(scores[best][0])
    assert history[0]["size"] <= 0.8
    assert set(ratios) == {"0", "2", "6"} and ratios[best] > 0
    assert all(v == 0 for g, v in ratios.items() if g != best)


def test_ratios_netadapt_step_meets_the_budget_and_records_the_rounds(trained_digits, digits_task, caplog,
                                                                       monkeypatch):
    from torchslim.progress import PERIOD_ENV, listen
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(PERIOD_ENV, "0")   # every progress update an event
    events = []
    x = digits_task.example_inputs(1)
    dense = count_macs(trained_digits, x)
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=0.6, budget="macs", ratios="netadapt", adapt_rounds=3,
                               sensitivity_steps=10)
    with listen(events.append):
        pruned = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    record = session.info["metrics"]["netadapt"]
    history = record["rounds"]
    assert record["cost"] == "macs" and record["target"] == 0.6
    # progress per candidate: 3 rounds x 3 groups
    done = [(e["done"], e["total"], e["round"]) for e in events if e.get("desc") == "netadapt"]
    assert done[-1] == (9, 9, 3) and len(done) == 9
    assert [h["round"] for h in history] == [1, 2, 3]
    for h in history:   # each round meets its geometric target: 0.4 ** (r / 3) of the MACs
        assert h["size"] <= 0.4 ** (h["round"] / 3) + 1e-9
    # the step prunes the model to the kept counts NetAdapt ended with
    removed = 1 - count_macs(pruned, x) / dense
    assert removed == pytest.approx(1 - history[-1]["size"], abs=1e-6) and removed >= 0.6 - 1e-9
    ratios = record["ratios"]
    for g, r in ratios.items():
        orig = trained_digits.get_submodule(g)
        orig = getattr(orig, "out_channels", None) or orig.out_features
        kept = pruned.get_submodule(g)
        kept = getattr(kept, "out_channels", None) or kept.out_features
        assert kept == max(math.floor((1 - r) * orig + 1e-6), 1)
    assert not session.warnings
    # the step's summary names the plan, not the 0% the plan leaves as the default sparsity
    summary = [r.getMessage() for r in caplog.records if "channel pruning (layer" in r.getMessage()]
    assert summary and f"(layer, {sum(1 for r in ratios.values() if r > 0)} per-layer sparsities)" in summary[-1]


def test_netadapt_refuses_a_budget_out_of_reach_one_group_per_round(trained_digits, digits_task):
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=0.99, budget="macs", ratios="netadapt",
                               adapt_rounds=1)
    with pytest.raises(RecipeError, match=r"round 1 of 1: no channel group can bring the model to 1\.0% of its "
                                          r"macs alone.*more adapt_rounds or a smaller sparsity"):
        run_prune(copy.deepcopy(trained_digits), cfg, Session(task=digits_task), "magnitude")
    with pytest.raises(RecipeError, match="no channel group to adapt"):   # the classifier alone: no group
        run_prune(copy.deepcopy(trained_digits), dataclasses.replace(cfg, targets=("9",)),
                  Session(task=digits_task), "magnitude")


def test_netadapt_keeps_max_layer_sparsity_and_round_to(trained_digits, digits_task):
    """Candidates keep what the step's final prune would keep: at least 1 - max_layer_sparsity of
    each group, in multiples of round_to, so the step meets the budget the rounds met."""
    x = digits_task.example_inputs(1)
    dense = count_macs(trained_digits, x)
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=0.5, budget="macs", ratios="netadapt", adapt_rounds=3,
                               max_layer_sparsity=0.6, round_to=8)
    pruned = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    record = session.info["metrics"]["netadapt"]
    for g, n in (("0", 32), ("2", 64), ("6", 128)):
        layer = pruned.get_submodule(g)
        kept = getattr(layer, "out_channels", None) or layer.out_features
        assert kept % 8 == 0 and kept >= 0.4 * n and record["ratios"][g] <= 0.6
    assert 1 - count_macs(pruned, x) / dense == pytest.approx(1 - record["rounds"][-1]["size"], abs=1e-6)
    assert record["rounds"][-1]["size"] <= 0.5


def test_netadapt_bad_input():
    with pytest.raises(RecipeError, match="netadapt adapts channel groups"):
        MagnitudePruneConfig(ratios="netadapt", sparsity=0.5)
    with pytest.raises(RecipeError, match="adapt_rounds: read with ratios: netadapt only"):
        MagnitudePruneConfig(granularity="channel", adapt_rounds=3)
    with pytest.raises(RecipeError, match="netadapt needs a ranking criterion"):
        ThresholdPruneConfig(granularity="channel", ratios="netadapt", alpha=0.5)
    with pytest.raises(RecipeError, match="above 0"):
        MagnitudePruneConfig(granularity="channel", ratios="netadapt", sparsity=0.0)
    with pytest.raises(RecipeError, match="sensitivity and allocation"):
        MagnitudePruneConfig(granularity="channel", ratios="netadapt", sparsity=0.5, allocation="knapsack")
    with pytest.raises(RecipeError, match="adapt_rounds"):
        MagnitudePruneConfig(granularity="channel", ratios="netadapt", sparsity=0.5, adapt_rounds=0)


def test_bisection_finds_the_largest_count_meeting_the_target():
    from torchslim.methods.prune.adapt import _bisect
    made = []

    def make(kept):
        made.append(kept)
        return kept

    allowed = list(range(63, 0, -1))      # 64 channels: keep 63 ... 1
    model, removed, left = _bisect(allowed, make, float, 20.5, 64)
    assert (model, removed, left) == (20, 44, 20.0)
    assert len(made) <= 8                  # the smallest count, then log2(63) halvings
    assert _bisect(allowed, make, lambda k: k + 100.0, 20.5, 64) is None   # nothing meets it
    # a noisy figure made 24 kept look within the target; the steadier one confirms 20 after 4 tries
    noisy = lambda k: 20.0 if k == 24 else float(k)   # noqa: E731
    assert _bisect(allowed, make, noisy, 20.5, 64) == (24, 40, 20.0)   # without confirm: fooled
    assert _bisect(allowed, make, noisy, 20.5, 64, confirm=float, tries=5) == (20, 44, 20.0)
    assert _bisect(allowed, make, noisy, 20.5, 64, confirm=float, tries=3) is None   # 24, 23, 22: none


def test_netadapt_for_a_latency_budget_plans_on_the_timed_cost(trained_digits, digits_task, fake_latency):
    """On a clock with a fixed overhead (conftest ``fake_latency``), removing 30% of the time takes
    more than 30% of the MACs: a plan that fell back to counting MACs would stop short."""
    x = digits_task.example_inputs(1)
    dense_macs = count_macs(trained_digits, x)

    def clock(m):
        return 1.0 + count_macs(m, x) / 1e6

    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="channel", sparsity=0.3, budget="latency", latency_batch_size=8,
                               ratios="netadapt", adapt_rounds=2)
    pruned = run_prune(copy.deepcopy(trained_digits), cfg, session, "magnitude")
    record = session.info["metrics"]["netadapt"]
    assert record["cost"] == "latency" and fake_latency   # timed, on the fake clock
    timed = record["latency"]
    assert timed["batch_size"] == 8 and timed["runtime"] == "eager" and timed["unstable"] == 0
    assert timed["dense_ms"] == pytest.approx(8 * clock(trained_digits), rel=1e-6)
    assert timed["planned_ms"] == pytest.approx(8 * clock(pruned), rel=1e-6)
    assert timed["measured"] == pytest.approx(1 - clock(pruned) / clock(trained_digits), abs=1e-6)
    assert [h["round"] for h in record["rounds"]] == [1, 2]
    for h in record["rounds"]:   # each round met its target on that clock
        assert h["size"] <= 0.7 ** (h["round"] / 2) + 1e-9
    assert timed["measured"] >= 0.3 - 1e-9 and not session.warnings
    assert 1 - count_macs(pruned, x) / dense_macs > 0.3 / (1 - 1 / clock(trained_digits)) - 1e-9
