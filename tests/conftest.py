"""Shared test fixtures: data directory, small real models, a trained digits model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    """$TORCHSLIM_DATA, else ../shared/data beside the repository, else None."""
    env = os.environ.get("TORCHSLIM_DATA")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def data_root() -> Path:
    d = data_dir()
    if d is None or not (d / "mnist").is_dir():
        pytest.skip("benchmark data not found: set TORCHSLIM_DATA to the folder holding mnist/")
    return d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models: one thread is faster and steadier on a shared machine
    yield


@pytest.fixture(scope="session")
def digits_task():
    import torchslim
    return torchslim.build_task("digits")


@pytest.fixture(scope="session")
def trained_digits(digits_task):
    """A digits-cnn trained for a few epochs (shared; tests must deepcopy before changing it)."""
    import torchslim
    from torchslim.train import TrainConfig, train

    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")
    train(model, digits_task, TrainConfig(optimizer="adamw", epochs=8, lr=0.003, loggers=()))
    return model


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each holds its own torch and models)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


@pytest.fixture
def fake_latency(monkeypatch, digits_task):
    """Latency budgets on a clock that does not depend on the machine: a forward pass of the
    digits model "takes" 1 ms plus 1 ms per million MACs of one example, times the batch (a fixed
    overhead, so the fraction of time a cut saves is smaller than the fraction of MACs). Returns
    the list of figures handed out, one per timing."""
    import torchslim.methods.prune.cost as cost
    from torchslim.measure import Timing, count_macs

    x = digits_task.example_inputs(1)
    calls: list[float] = []

    def fake(model, task, runtime="eager", batch_sizes=(1,), **kwargs):
        ms = 1.0 + count_macs(model, x) / 1e6
        calls.append(ms)
        return {str(b): Timing(ms * b, 0.0, ms * b, 10, 1) for b in batch_sizes}

    monkeypatch.setattr(cost, "measure_runtime_latency", fake)
    return calls
