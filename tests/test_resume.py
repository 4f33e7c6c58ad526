"""Resuming: a Trainer restarted from ``last.pt`` ends bit-exactly where an uninterrupted run ends,
and ``torchslim compress --resume`` continues a SIGKILLed run (CONTRACT sections 3 and 5)."""

from __future__ import annotations

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
from torchslim.errors import ArtifactError
from torchslim.recipe import Recipe
from torchslim.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, which only adds synchronization (and on a
    busy 2-core machine makes every small op wait for a descheduled thread)."""
    torch.set_num_threads(1)
    yield


BS = 128
SPE = 1257 // BS            # digits train split, drop_last -> 9 steps per epoch
TINY = {"channels": [8, 16], "hidden": 32}


class Interrupt(Exception):
    """Stands in for a crash in the middle of an epoch."""


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:digits-cnn", args=TINY)   # has a Dropout(0.2)


def run(task, config, ckpt_dir, *, crash_in_epoch=None, init_seed=0):
    """Train; with ``crash_in_epoch=e`` raise at the first optimizer step of epoch ``e`` (1-based)."""
    def crash(m, step, total):
        if crash_in_epoch is not None and step == (crash_in_epoch - 1) * SPE + 1:
            raise Interrupt
    t = Trainer(tiny(init_seed), task, config, ckpt_dir=ckpt_dir, callbacks=[crash])
    t.fit()
    return t


CONFIGS = {
    "sgd-cosine-warmup-regularized": dict(optimizer="sgd", schedule="cosine", warmup=0.5, weight_decay=1e-4,
                                          label_smoothing=0.1, grad_clip=1.0, early_stopping=3),
    "adamw-onecycle": dict(optimizer="adamw", schedule="onecycle", lr=0.005),
    "sgd-plateau-warmup": dict(optimizer="sgd", schedule="plateau", warmup=1.0, lr=0.05),
    "adamw-step-early-stopping": dict(optimizer="adamw", schedule="step", step_size=1, gamma=0.5,
                                      early_stopping=1, lr=0.02),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bit_exact(digits_task, tmp_path, name):
    """Regression: the shuffle generator was seeded once per fit(), so a run resumed at epoch 3
    replayed epoch 1's order and ended with other weights."""
    config = TrainConfig(epochs=4, batch_size=BS, seed=3, loggers=(), **{"lr": 0.02, **CONFIGS[name]})
    straight = run(digits_task, config, tmp_path / "a")

    with pytest.raises(Interrupt):
        run(digits_task, config, tmp_path / "b", crash_in_epoch=3)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1                        # epochs 1 and 2 are in the checkpoint
    # a different initialization proves the weights come from the checkpoint
    resumed = run(digits_task, config, tmp_path / "b", init_seed=99)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history == straight.history
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


def test_resume_after_early_stop_does_not_train_again(digits_task, tmp_path):
    config = TrainConfig(epochs=6, batch_size=BS, early_stopping=1, loggers=())
    first = Trainer(tiny(), digits_task, config, ckpt_dir=tmp_path)
    vals = iter([0.5, 0.7, 0.6, 0.8, 0.9, 0.95])
    first._validate = lambda m: next(vals)
    first.fit()
    assert len(first.history) == 3                    # stopped after epoch 3

    def never(m, b):
        raise AssertionError("a finished run must not train again")
    again = Trainer(tiny(5), digits_task, config, ckpt_dir=tmp_path, loss_fn=never)
    again.fit()
    assert again.history == first.history
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)    # the best (epoch 2) weights, restored


def test_resume_refuses_other_config(digits_task, tmp_path):
    run(digits_task, TrainConfig(epochs=1, lr=0.01, batch_size=BS, loggers=()), tmp_path)
    with pytest.raises(ArtifactError, match=r"another training configuration "
                                            r"\(epochs: 1 -> 2, lr: 0.01 -> 0.02\).*delete .*last.pt"):
        run(digits_task, TrainConfig(epochs=2, lr=0.02, batch_size=BS, loggers=()), tmp_path)
    # as if written by 2 processes, each taking half the steps
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "steps_per_epoch": SPE // 2, "world_size": 2}, tmp_path / "last.pt")
    with pytest.raises(ArtifactError, match=rf"{SPE // 2} steps per epoch \(2 process\(es\)\); this run "
                                            rf"has {SPE} \(1 process\(es\)\); resume with the same number"):
        run(digits_task, TrainConfig(epochs=1, lr=0.01, batch_size=BS, loggers=()), tmp_path)


def test_resume_refuses_other_model(digits_task, tmp_path):
    config = TrainConfig(epochs=1, batch_size=BS, loggers=())
    run(digits_task, config, tmp_path)
    other = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    with pytest.raises(ArtifactError, match="does not fit this model"):
        Trainer(other, digits_task, config, ckpt_dir=tmp_path).fit()


def test_corrupt_checkpoint_is_reported(digits_task, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ArtifactError, match=r"cannot read the training checkpoint .*last.pt.*delete"):
        run(digits_task, TrainConfig(epochs=1, batch_size=BS, loggers=()), tmp_path)


# -- the whole command line -------------------------------------------------------------------
RECIPE = f"""\
model: {{spec: "zoo:digits-cnn", args: {json.dumps(TINY)}}}
task: digits
train: {{method: adamw, epochs: 60, lr: 0.01, batch_size: 64, seed: 0}}
steps:
  - prune: {{method: magnitude, sparsity: 0.5, schedule: oneshot,
            finetune: {{optimizer: adamw, epochs: 2, lr: 0.002}}}}
measure: {{batch_sizes: [1]}}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchslim", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=180)


def test_cli_kill_and_resume(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out, partial = tmp_path / "run", tmp_path / ".run.partial"
    ckpt = partial / "steps" / "00-baseline" / "train" / "last.pt"

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torchslim", "compress", "recipe.yaml",
                                 "--out", "run"], cwd=tmp_path, env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ckpt.is_file(), (tmp_path / "killed.log").read_text()[-2000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    assert not (partial / "steps" / "00-baseline" / "step.json").exists()   # killed mid-training
    killed_at = torch.load(ckpt, weights_only=True)["epoch"] + 1
    assert killed_at < 60

    r = _cli(tmp_path, "compress", "recipe.yaml", "--out", "run")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "--resume" in r.stderr and "Traceback" not in r.stderr

    r = _cli(tmp_path, "compress", "recipe.yaml", "--out", "run", "--resume", "--set", "train.lr=0.02")
    assert r.returncode == 2, r.stderr
    assert "error: --resume: the baseline was interrupted with other settings (train.lr: 0.01 -> 0.02)" in r.stderr

    r = _cli(tmp_path, "compress", "recipe.yaml", "--out", "run", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"baseline: resumed from {ckpt.relative_to(tmp_path)} after epoch {killed_at}/60" in r.stderr
    assert f"baseline epoch {killed_at}/60" not in r.stderr and "baseline epoch 60/60" in r.stderr
    assert not partial.exists() and out.is_dir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in metrics["steps"]] == ["baseline", "prune-magnitude"]
    assert metrics["environment"]["world_size"] == 1
    assert all(s["metric"]["value"] > 0.9 for s in metrics["steps"])
    final = torchslim.load(out / "model")
    accuracy = torchslim.build_task("digits").evaluate(final)
    assert accuracy == pytest.approx(metrics["steps"][-1]["metric"]["value"])

    # the killed-and-resumed baseline is bit-identical to one trained without interruption
    torch.set_num_threads(1)                         # as in the children (OMP_NUM_THREADS=1)
    recipe = Recipe.from_yaml(tmp_path / "recipe.yaml")
    model = tiny(recipe.train.seed)                  # the pipeline seeds the init with train.seed
    Trainer(model, torchslim.build_task("digits"), recipe.train).fit()
    baseline = torchslim.load(out / "steps" / "00-baseline" / "model").state_dict()
    expected = model.state_dict()
    assert baseline.keys() == expected.keys()
    for k in expected:
        assert torch.equal(baseline[k], expected[k]), k
