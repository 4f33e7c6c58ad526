"""Real 2-process data-parallel runs under torchrun (gloo on CPU): the ``compress`` command, and a
check that both ranks train in lock-step on disjoint halves of every epoch (CONTRACT section 3)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchslim


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, which only adds synchronization (and on a
    busy 2-core machine makes every small op wait for a descheduled thread)."""
    torch.set_num_threads(1)
    yield


N_TRAIN, BS = 1257, 64   # digits train split; per rank ceil(1257 / 2) = 629 samples -> 9 full batches

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def torchrun(cwd: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


RECIPE = """\
model: {spec: "zoo:digits-cnn", args: {channels: [8, 16], hidden: 32}}
task: digits
train: {method: adamw, epochs: 4, lr: 0.01, batch_size: 64, seed: 0}
steps:
  - prune: {method: magnitude, sparsity: 0.5, schedule: oneshot,
            finetune: {optimizer: adamw, epochs: 2, lr: 0.002}}
  - export: {formats: FORMATS}
measure: {batch_sizes: [1]}
"""
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def test_torchrun_compress(tmp_path):
    """Regression: rank 1 used to find the ``.run.partial`` rank 0 had just created and fail with
    "a failed run left its checkpoints" while rank 0 waited for it; and every rank ran the export."""
    formats = "[artifact, onnx]" if HAS_ONNX else "[artifact]"
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("FORMATS", formats))
    r = torchrun(tmp_path, "-m", "torchslim", "compress", "recipe.yaml", "--out", "run")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    out = tmp_path / "run"
    assert not (tmp_path / ".run.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["world_size"] == 2
    assert [s["name"] for s in metrics["steps"]] == ["baseline", "prune-magnitude", "export"]
    assert metrics["steps"][-1]["nonzero_params"] < metrics["steps"][0]["nonzero_params"]
    if HAS_ONNX:   # written once, by rank 0
        assert (out / "onnx" / "model.onnx").is_file() and "onnx_max_abs_diff" in metrics["steps"][-1]
    model = torchslim.load(out / "model")
    acc = torchslim.build_task("digits").evaluate(model)
    assert acc == pytest.approx(metrics["steps"][-1]["metric"]["value"]) and acc > 0.85
    # rank 0 alone printed the table; per-step checkpoints and curves are in place
    assert r.stdout.count("wrote run") == 1
    assert r.stderr.count(f"2 processes x batch_size {BS} = effective batch size {2 * BS}") == 2  # baseline, finetune
    assert (out / "steps" / "00-baseline" / "train" / "last.pt").is_file()
    assert (out / "steps" / "01-prune-magnitude" / "train" / "last.pt").is_file()
    ckpt = torch.load(out / "steps" / "00-baseline" / "train" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["steps_per_epoch"] == (N_TRAIN + 1) // 2 // BS
    assert list((out / "logs" / "baseline").glob("events.out.tfevents.*"))


SYNC_SCRIPT = """\
import sys
import torch
from torch.utils.data import TensorDataset
import torchslim
from torchslim import distributed as tsdist
from torchslim.train import TrainConfig, Trainer

assert tsdist.init_from_env()
rank = tsdist.rank()
task = torchslim.build_task("digits")
x, y = task.split("train").tensors
task._splits["train"] = TensorDataset(x, y, torch.arange(len(y)))   # batch[2]: sample ids

torch.manual_seed(100 + rank)   # different initial weights: DDP must start every rank from rank 0's
model = torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32})
seen, steps = [], []

def loss_fn(m, b):
    if m.training:              # the trainer's eval-mode probe for unused parameters is not a step
        seen.append(b[2].clone())
    return task.loss(task.forward(m, b), b)

def cb(m, step, total):
    steps.append((step, total))

config = TrainConfig(optimizer="sgd", epochs=2, lr=0.05, batch_size=64, dropout=0.3, loggers=())
t = Trainer(model, task, config, loss_fn=loss_fn, callbacks=[cb])
t.fit()

# the same run, crashed at the first step of epoch 2 on both ranks, then resumed from last.pt
class Crash(Exception):
    pass

def crash(m, step, total):
    if step == total // 2 + 1:
        raise Crash

torch.manual_seed(100 + rank)   # the initial weights of the run above
try:
    Trainer(torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}), task,
            config, callbacks=[crash], ckpt_dir=f"{sys.argv[1]}/ckpt").fit()
    raise AssertionError("no crash")
except Crash:
    pass
resumed = torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32})
Trainer(resumed, task, config, ckpt_dir=f"{sys.argv[1]}/ckpt").fit()
torch.save({"state": model.state_dict(), "seen": seen, "steps": steps, "history": t.history,
            "resumed": resumed.state_dict()}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_ranks_train_in_sync_on_disjoint_halves_and_resume_exactly(tmp_path):
    (tmp_path / "sync.py").write_text(SYNC_SCRIPT)
    r = torchrun(tmp_path, "sync.py", str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))

    # identical weights at the end: one model, data-parallel
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # each rank took 9 steps per epoch (a single process takes 1257 // 64 = 19)
    spe = ((N_TRAIN + 1) // 2) // BS
    assert spe == 9
    assert r0["steps"] == r1["steps"] == [(s, 2 * spe) for s in range(1, 2 * spe + 1)]
    for epoch in range(2):
        ids = [torch.cat(r["seen"][epoch * spe:(epoch + 1) * spe]) for r in (r0, r1)]
        assert len(ids[0]) == len(ids[1]) == spe * BS
        assert len(set(ids[0].tolist()) & set(ids[1].tolist())) == 0      # disjoint halves
        assert len(set(ids[0].tolist()) | set(ids[1].tolist())) == 2 * spe * BS
    # epochs are shuffled differently
    assert not torch.equal(torch.cat(r0["seen"][:spe]), torch.cat(r0["seen"][spe:]))
    # a crashed and resumed data-parallel run ends with the very same weights
    for r in (r0, r1):
        for k in r["state"]:
            assert torch.equal(r["resumed"][k], r["state"][k]), k
    # the logged loss is reduced over both ranks, so both report the same curve
    assert r0["history"] == r1["history"]
    assert r0["history"][-1]["train/loss"] < r0["history"][0]["train/loss"]


@pytest.mark.parametrize("resume", [False, True])
def test_torchrun_bad_input_exits_2_on_every_rank(tmp_path, resume):
    """Bad input under torchrun: every rank exits 2 at once. Regression: the --resume recipe check
    ran on rank 0 alone, so rank 1 waited at a barrier until torchrun killed it."""
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("FORMATS", "[artifact]"))
    (tmp_path / ".run.partial" / "steps" / "00-baseline").mkdir(parents=True)
    (tmp_path / ".run.partial" / "steps" / "00-baseline" / "step.json").write_text("{}")
    (tmp_path / ".run.partial" / "recipe.yaml").write_text("model: {spec: 'zoo:lenet-5'}\n")
    r = torchrun(tmp_path, "-m", "torchslim", "compress", "recipe.yaml", "--out", "run",
                 *(["--resume"] if resume else []), timeout=90)
    assert r.returncode != 0
    msg = ("error: --resume: the baseline already finished with other settings (" if resume else
           "error: a failed run left its checkpoints in .run.partial; pass --resume")
    assert r.stderr.count(msg) >= 1
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)   # torchrun's report of failed ranks
    # every rank exits 2 by itself; torchrun may SIGTERM (-15) a rank that is exiting at the same
    # moment, but none may fail otherwise (a rank stuck at a barrier ends with a timeout error)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert r.stderr.count(msg) == 2 or "-15" in codes
    assert not (tmp_path / "run").exists()


def test_torchrun_trains_a_model_with_unused_parameters(tmp_path):
    """Regression: BERT's pooler gets no gradient under mean pooling, and DDP waited for it
    ("Expected to have finished reduction in the prior iteration")."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    from conftest import data_dir
    data = data_dir()
    if data is None or not (data / "stsbenchmark").is_dir():
        pytest.skip("STS Benchmark files not found (TORCHSLIM_DATA)")
    (tmp_path / "recipe.yaml").write_text(
        f"model: hf:{tmp_path / 'bert'}\ntask: stsb\n"
        "steps:\n  - train: {method: adamw, epochs: 1, lr: 0.001, batch_size: 128, loggers: []}\n")
    r = torchrun(tmp_path, "-m", "torchslim", "compress", "recipe.yaml", "--out", "run",
                 "--data-dir", str(data), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["environment"]["world_size"] == 2 and m["steps"][1]["metric"]["name"] == "spearman"
