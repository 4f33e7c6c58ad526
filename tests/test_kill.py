"""Kill anywhere: a real run killed (SIGKILL) at several moments and resumed ends with the same
tensors and figures as an uninterrupted run (timings aside), and leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchslim

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
RECIPE = f"""\
model: {{spec: "zoo:digits-cnn", args: {{channels: [4, 8], hidden: 16}}}}
task: digits
train: {{method: adamw, epochs: 8, lr: 0.01, seed: 0}}
steps:
  - prune: {{method: magnitude, sparsity: 0.6, finetune: {{method: adamw, epochs: 3, lr: 0.003}}}}
  - quantize: {{method: linear, bits: 8}}
  - export: {{formats: {"[artifact, onnx]" if HAS_ONNX else "[artifact]"}}}
measure: {{batch_sizes: [1], latency: false}}
"""
#: figures that do not depend on timing
SAME = ("name", "params", "nonzero_params", "size_bytes", "macs", "metric", "config", "layer_sparsity",
        "onnx_max_abs_diff", "warnings", "bn_recalibrated")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _compress(cwd: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchslim", "compress", "recipe.yaml", "--out", out, *extra],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _figures(run: Path) -> list[dict]:
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    return [{k: s.get(k) for k in SAME} for s in steps]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("kill")
    (cwd / "recipe.yaml").write_text(RECIPE)
    r = _compress(cwd, "ref")
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "ref"


# where to kill: a path inside the run's temporary directory whose appearance marks the moment
MOMENTS = {
    "baseline-training": "steps/00-baseline/train/last.pt",
    "between-steps": "steps/01-prune-magnitude/step.json",
    "during-export": "onnx" if HAS_ONNX else "steps/03-export/model",
    "report-writing": "plots",
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(reference, tmp_path, moment):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    marker = tmp_path / ".run.partial" / MOMENTS[moment]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torchslim", "compress", "recipe.yaml", "--out", "run"],
                                cwd=tmp_path, env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert marker.exists(), (tmp_path / "killed.log").read_text()[-2000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    if proc.returncode == 0:   # it finished between the marker and the kill: nothing to resume
        pytest.skip(f"the run ended before the kill at {moment}")
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.partial").is_dir()
    r = _compress(tmp_path, "run", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    assert _figures(run) == _figures(reference)
    got, want = torchslim.load(run / "model").state_dict(), torchslim.load(reference / "model").state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # nothing left behind: no temporary directory, lock or half-written file anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.log", "recipe.yaml", "run"]
    assert [p for p in run.rglob(".*")] == []
