"""BatchNorm re-calibration after weight-changing steps, and the warnings a run must not hide."""

from __future__ import annotations

import pytest
import torch

import torchslim
from torchslim.pipeline import execute
from torchslim.recipe import Recipe
from torchslim.session import Session, recalibrate_batchnorm

BN_MODEL = "py:tests/assets/architectures.py:bn_convnet"


@pytest.fixture(autouse=True)
def _trust(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")   # the test's own model file
    monkeypatch.chdir(torchslim.__file__.rsplit("/src/", 1)[0])


def _run(recalibrate_bn: int, steps: list, train: dict | None = None):
    data = {"model": BN_MODEL, "task": "digits", "steps": steps, "recalibrate_bn": recalibrate_bn,
            "measure": {"batch_sizes": [1], "latency": False}}
    if train is not None:
        data["train"] = train
    recipe = Recipe.from_dict(data)
    torch.manual_seed(0)
    return execute(recipe, torchslim.build_task("digits"), torchslim.build_model(BN_MODEL))


def test_recalibration_recovers_one_shot_pruning_and_a_collapse_is_flagged():
    train = {"optimizer": "adamw", "epochs": 6, "lr": 0.003, "loggers": []}
    steps = [{"prune": {"method": "magnitude", "sparsity": 0.8}}]
    plain, plain_model = _run(0, steps, train)
    recal, recal_model = _run(512, steps, train)
    base = plain["steps"][0]["metric"]["value"]
    assert base > 0.9 and recal["steps"][0]["metric"]["value"] == base
    lost = plain["steps"][1]
    assert base - lost["metric"]["value"] > 0.3                       # BatchNorm statistics no longer fit
    assert [w["code"] for w in lost["warnings"]] == ["metric_drop"]
    assert "accuracy fell from" in lost["warnings"][0]["message"] and "bn_recalibrated" not in lost
    kept = recal["steps"][1]
    assert kept["bn_recalibrated"] == {"layers": 2, "samples": 512}
    assert kept["metric"]["value"] > base - 0.05 and "warnings" not in kept
    # only the statistics moved: every weight is the same in both runs
    for (name, a), b in zip(plain_model.state_dict().items(), recal_model.state_dict().values()):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(a, b), name


def test_steps_that_train_are_not_recalibrated():
    metrics, _ = _run(512, [{"prune": {"method": "magnitude", "sparsity": 0.5,
                                       "finetune": {"optimizer": "adamw", "epochs": 1, "loggers": []}}}],
                      {"optimizer": "adamw", "epochs": 1, "lr": 0.003, "loggers": []})
    assert "bn_recalibrated" not in metrics["steps"][1]


def test_untrained_baseline_is_flagged_at_chance_level(digits_task):
    from collections import Counter

    labels = [int(y) for _, y in digits_task.split("test")]
    chance = max(Counter(labels).values()) / len(labels)             # the most frequent class's share
    assert digits_task.chance_level() == pytest.approx(chance) and 0.09 < chance < 0.11
    metrics, _ = _run(512, [])                                       # no train block: random weights
    (row,) = metrics["steps"]
    assert row["metric"]["value"] < 0.2
    (warning,) = row["warnings"]
    assert warning["code"] == "chance_level" and f"near chance level ({chance:.4f})" in warning["message"]


def test_recalibrated_statistics_are_the_exact_batch_statistics(digits_task):
    model = torchslim.build_model(BN_MODEL).eval()
    batches = Session(task=digits_task).calibration_batches(256, batch_size=64)
    before = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, digits_task, batches) == 2
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        act = model.features[0](x)                                   # the first BatchNorm's input
    bn = model.features[1]
    torch.testing.assert_close(bn.running_mean, act.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, act.var(dim=(0, 2, 3)), rtol=1e-2, atol=1e-5)
    assert not model.training and bn.momentum == 0.1                  # flags and momentum restored
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
