"""Progress within an epoch: periodic log lines off a terminal, events for the Python API."""

from __future__ import annotations

import logging
import re

import torch

import torchslim
from torchslim.progress import PERIOD_ENV, listen
from torchslim.train import TrainConfig, train

LINE = re.compile(r"^baseline: epoch (\d)/2 loss (\d+\.\d{4}) step (\d+)/(\d+) \((\d+)%\), [\d.e+]+ step/s, "
                  r"ETA \d+:\d\d:\d\d$")


def test_training_logs_progress_lines_within_epochs(monkeypatch, caplog, digits_task):
    monkeypatch.setenv(PERIOD_ENV, "0")  # a line at every step instead of every 30 s
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    events = []
    with caplog.at_level(logging.INFO, logger="torchslim"), listen(events.append):
        train(model, digits_task, TrainConfig(epochs=2, batch_size=256, loggers=()), desc="baseline")
    lines = [r.getMessage() for r in caplog.records if r.name == "torchslim.progress"
             and r.getMessage().startswith("baseline:")]
    steps_per_epoch = len(digits_task.split("train")) // 256  # the last partial batch is dropped
    assert len(lines) == 2 * steps_per_epoch
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines[:2]
    assert [int(m[3]) for m in parsed] == list(range(1, 2 * steps_per_epoch + 1))
    assert {int(m[4]) for m in parsed} == {2 * steps_per_epoch}
    assert [int(m[1]) for m in parsed] == [1] * steps_per_epoch + [2] * steps_per_epoch
    progress = [e for e in events if e["kind"] == "progress" and e["desc"] == "baseline"]
    assert [e["done"] for e in progress] == list(range(1, 2 * steps_per_epoch + 1))
    assert progress[-1]["eta_s"] == 0 and progress[0]["rate"] > 0
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["train/loss"] > 0 for e in epochs)


def test_no_lines_before_the_period(monkeypatch, caplog, digits_task):
    monkeypatch.setenv(PERIOD_ENV, "3600")
    model = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    with caplog.at_level(logging.INFO, logger="torchslim"):
        train(model, digits_task, TrainConfig(epochs=1, batch_size=256, loggers=()))
    assert not [r for r in caplog.records if r.name == "torchslim.progress"]
    assert any("epoch 1/1" in r.getMessage() for r in caplog.records)  # the epoch line stays


def test_compress_on_event(tmp_path, monkeypatch):
    monkeypatch.setenv(PERIOD_ENV, "0")
    events = []
    torchslim.compress({"model": {"spec": "zoo:digits-cnn", "args": {"channels": [4, 8], "hidden": 16}},
                        "task": "digits", "train": {"epochs": 1, "batch_size": 512, "loggers": []},
                        "measure": {"batch_sizes": [1], "latency": False},
                        "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]},
                       tmp_path / "run", on_event=events.append)
    kinds = {(e["kind"], e.get("desc")) for e in events}
    assert ("progress", "baseline") in kinds and ("progress", "accuracy on test") in kinds
    assert ("epoch", "baseline") in kinds
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["name"] for e in steps] == ["baseline", "prune-magnitude"]
    assert steps[1]["row"]["nonzero_params"] < steps[0]["row"]["nonzero_params"]
