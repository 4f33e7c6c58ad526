"""Runs that cannot corrupt one another: one run per output directory, --out resolved before
any work, strict JSON. (Hostile inputs are in test_bad_input.py and test_recipe_fuzz.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchslim
from torchslim.cli import main

RECIPE = """\
model: {spec: "zoo:digits-cnn", args: {channels: [4, 8], hidden: 16}}
task: digits
train: {method: adamw, epochs: EPOCHS, lr: 0.01, loggers: []}
steps:
  - prune: {method: magnitude, sparsity: 0.5}
measure: {batch_sizes: [1], latency: false}
"""


def _cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_second_run_into_the_same_out_is_refused_at_once(tmp_path, capsys):
    (tmp_path / "slow.yaml").write_text(RECIPE.replace("EPOCHS", "40"))
    (tmp_path / "fast.yaml").write_text(RECIPE.replace("EPOCHS", "1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "torchslim", "compress", "slow.yaml", "--out", "run"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".run.lock"
        deadline = time.monotonic() + 120
        while not (tmp_path / ".run.partial").is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.is_file() and first.poll() is None, first.communicate()[1][-2000:]
        os.chdir(tmp_path)
        t0 = time.monotonic()
        for extra in ([], ["--resume"]):
            code, err = _cli(["compress", "fast.yaml", "--out", "run", *extra], capsys)
            assert code == 2, err
            assert f"is in use by another torchslim run (pid {first.pid})" in err and err.startswith("error:")
        assert time.monotonic() - t0 < 10          # refused at once, not after its own training
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-2000:]
    # the surviving run's files all come from the slow recipe, and no lock is left behind
    assert "epochs: 40" in (tmp_path / "run" / "recipe.yaml").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s["name"] for s in metrics["steps"]] == ["baseline", "prune-magnitude"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.yaml", "run", "slow.yaml"]


@pytest.mark.parametrize("out", [".", "..", "sub/..", "./"])
def test_out_naming_the_current_directory_or_a_parent_is_refused_before_any_work(tmp_path, capsys,
                                                                                   monkeypatch, out):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "r.yaml").write_text(RECIPE.replace("EPOCHS", "1"))
    monkeypatch.chdir(work / "sub")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = _cli(["compress", "r.yaml", "--out", out], capsys)
    assert code == 2 and err.startswith("error: --out") and "current directory or one of its parents" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before   # nothing written anywhere


def test_out_that_is_a_symlink_to_an_empty_directory_is_written_through(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("EPOCHS", "1"))
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to("target")
    code, err = _cli(["compress", "r.yaml", "--out", "link"], capsys)
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "metrics.json").is_file()
    assert torchslim.load(tmp_path / "link" / "model") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "r.yaml", "target"]


def test_out_under_directories_that_do_not_exist_yet_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("EPOCHS", "1"))
    code, err = _cli(["compress", "r.yaml", "--out", "runs/a/first"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "a" / "first" / "metrics.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == ["first"]   # no lock or partial left
    (tmp_path / "file").write_text("x")
    code, err = _cli(["compress", "r.yaml", "--out", "file/run"], capsys)
    assert code == 2 and err.startswith("error: --out file/run: cannot create its parent directory"), err


def test_metrics_json_is_strict_json_when_a_figure_is_not_finite(tmp_path):
    from torchslim.fileio import write_json

    write_json(tmp_path / "m.json", {"metric": {"value": float("nan")}, "latency": [float("inf"), 1.5]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "metric": {"value": None}, "latency": [None, 1.5]}


def _nan_weights(tmp_path: Path, where: str = "weight") -> Path:
    import torch
    from safetensors.torch import save_file

    model = torchslim.build_model("zoo:digits-cnn")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    name = next(k for k in state if k.endswith(where) and state[k].is_floating_point())
    state[name].view(-1)[:3] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    return tmp_path / "nan.safetensors"


def test_a_model_with_nan_weights_is_refused_naming_the_tensor(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = _nan_weights(tmp_path)
    (tmp_path / "r.yaml").write_text(f"model: {{spec: zoo:digits-cnn, weights: {weights}}}\ntask: digits\n"
                                     "steps:\n  - quantize: {method: linear}\n  - export: {formats: [artifact]}\n")
    code, err = _cli(["compress", "r.yaml", "--out", "run"], capsys)
    assert code == 2 and "non-finite weights: 0.weight (3 NaN, 0 inf)" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_a_step_that_makes_weights_non_finite_stops_the_run_naming_it(tmp_path, monkeypatch):
    """A step's result is checked before it is saved or measured: nothing non-finite ships."""
    import torch

    import torchslim.pipeline as pl

    real = pl.apply_step

    def poisoning(model, step, ctx):
        model = real(model, step, ctx)
        with torch.no_grad():
            model[-1].weight.view(-1)[0] = float("inf")
        return model

    monkeypatch.setattr(pl, "apply_step", poisoning)
    recipe = {"model": "zoo:digits-cnn", "task": "digits", "steps": [{"prune": {"method": "magnitude"}}],
              "measure": {"batch_sizes": [1], "latency": False}}
    with pytest.raises(torchslim.errors.UserError,
                       match=r"step 1 \(prune-magnitude\) has non-finite weights: 9.weight \(0 NaN, 1 inf\)"):
        torchslim.compress(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / ".run.partial" / "steps" / "01-prune-magnitude" / "step.json").exists()


def test_measure_refuses_a_model_with_nan_weights(tmp_path, capsys):
    weights = _nan_weights(tmp_path, where="bias")
    code, err = _cli(["measure", "zoo:digits-cnn", "--task", "digits", "--weights", weights], capsys)
    assert code == 2 and "non-finite weights: 0.bias (3 NaN, 0 inf)" in err, err


EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\ndef f():\n    import torch\n    return torch.nn.Linear(1, 1)\n"


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return tmp_path / "evil.py", marker


def test_export_does_not_run_a_py_task_named_in_metrics_json(tmp_path, capsys, monkeypatch):
    from torchslim.artifact import TRUST_ENV

    monkeypatch.delenv(TRUST_ENV, raising=False)
    evil, marker = _evil(tmp_path)
    run = tmp_path / "run"
    torchslim.save(torchslim.build_model("zoo:digits-cnn"), run / "model")
    (run / "metrics.json").write_text(json.dumps({"task": f"py:{evil}:f", "steps": []}))
    code, err = _cli(["export", run, "--format", "onnx"], capsys)
    assert code == 2 and "name the task yourself with --task" in err, err
    assert not marker.exists()
    pytest.importorskip("onnxruntime")
    code, err = _cli(["export", run, "--format", "onnx", "--task", "digits"], capsys)
    assert code == 0 and (run / "onnx" / "model.onnx").is_file() and not marker.exists(), err


def _crash_in_second_step(monkeypatch):
    import torchslim.pipeline as pl

    real, calls = pl.apply_step, []

    def flaky(model, step, ctx):
        calls.append(step.key)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in step 2")
        return real(model, step, ctx)

    monkeypatch.setattr(pl, "apply_step", flaky)


def _crashed_run(tmp_path: Path, monkeypatch) -> dict:
    """Run prune then quantize into tmp_path/run, crashing in the quantize step; returns the recipe."""
    _crash_in_second_step(monkeypatch)
    recipe = {"model": "zoo:digits-cnn", "task": "digits",
              "steps": [{"prune": {"method": "magnitude"}}, {"quantize": {"method": "linear"}}],
              "measure": {"batch_sizes": [1], "latency": False}}
    with pytest.raises(RuntimeError, match="simulated"):
        torchslim.compress(recipe, tmp_path / "run")
    return recipe


def test_resume_refuses_a_checkpoint_edited_to_run_another_python_file(tmp_path, monkeypatch):
    from torchslim.artifact import TRUST_ENV

    monkeypatch.delenv(TRUST_ENV, raising=False)
    recipe = _crashed_run(tmp_path, monkeypatch)
    evil, marker = _evil(tmp_path)
    manifest = tmp_path / ".run.partial" / "steps" / "01-prune-magnitude" / "model" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["source"] = {"spec": f"py:{evil}:f", "args": {}, "file": str(evil), "factory": "f"}
    manifest.write_text(json.dumps(data))
    with pytest.raises(torchslim.errors.ArtifactError, match="refused: rebuilding this model imports"):
        torchslim.compress(recipe, tmp_path / "run", resume=True)
    assert not marker.exists()


def test_resume_rebuilds_the_recipes_own_py_model_without_a_trust_flag(tmp_path, monkeypatch):
    from torchslim.artifact import TRUST_ENV

    root = Path(torchslim.__file__).resolve().parents[2]
    monkeypatch.setenv(TRUST_ENV, "1")                     # building the model the recipe names
    _crash_in_second_step(monkeypatch)
    recipe = {"model": f"py:{root / 'tests/assets/architectures.py'}:bn_convnet", "task": "digits",
              "steps": [{"prune": {"method": "magnitude"}}, {"quantize": {"method": "linear"}}],
              "measure": {"batch_sizes": [1], "latency": False}}
    with pytest.raises(RuntimeError, match="simulated"):
        torchslim.compress(recipe, tmp_path / "run")
    monkeypatch.delenv(TRUST_ENV)
    import torchslim.pipeline as pl

    monkeypatch.setattr(pl, "preflight", lambda r, d=None: (None, torchslim.build_task("digits")))
    metrics = torchslim.compress(recipe, tmp_path / "run", resume=True)   # loads step 1's checkpoint
    assert [s["name"] for s in metrics["steps"]] == ["baseline", "prune-magnitude", "quantize-linear"]


def test_temporaries_of_a_killed_writer_do_not_reach_the_final_directory(tmp_path, monkeypatch):
    """A kill during plotting or saving leaves a 0-byte temporary; the resumed run removes it."""
    recipe = _crashed_run(tmp_path, monkeypatch)
    partial = tmp_path / ".run.partial"
    (partial / "plots").mkdir(exist_ok=True)
    (partial / "plots" / ".size.png.4242.0123abcd.tmp").write_bytes(b"")
    (partial / "steps" / "01-prune-magnitude" / ".model.k2x_9a0b").mkdir()
    torchslim.compress(recipe, tmp_path / "run", resume=True)
    leftovers = [p for p in (tmp_path / "run").rglob(".*")]
    assert leftovers == [], leftovers


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)                          # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("EPOCHS", "1"))
    code, err = _cli(["compress", "r.yaml", "--out", "run"], capsys)
    assert code == 2 and err.startswith("error: no space left on the device writing "), err
    assert "rerun (compress: with --resume" in err
    assert [p for p in (tmp_path / ".run.partial").rglob(".model.*")] == []   # the half-written save is gone


def test_resume_with_a_truncated_step_row_runs_that_step_again(tmp_path, monkeypatch):
    recipe = _crashed_run(tmp_path, monkeypatch)
    row = tmp_path / ".run.partial" / "steps" / "01-prune-magnitude" / "step.json"
    row.write_text(row.read_text()[:25])                                  # cut mid-object
    metrics = torchslim.compress(recipe, tmp_path / "run", resume=True)
    assert [s["name"] for s in metrics["steps"]] == ["baseline", "prune-magnitude", "quantize-linear"]
    assert json.loads((tmp_path / "run" / "steps" / "01-prune-magnitude" / "step.json").read_text())["name"] \
        == "prune-magnitude"


def test_a_model_that_outputs_nan_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nanout.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)) * torch.log(x.flatten(1)[:, :1] - 1)\n"   # log of a negative: NaN
        "def net():\n    return Net()\n")
    (tmp_path / "r.yaml").write_text("model: py:nanout.py:net\ntask: digits\ntrain: {epochs: 1}\nsteps: []\n")
    code, err = _cli(["compress", "r.yaml", "--out", "run"], capsys)
    assert code == 2 and "outputs non-finite values on the task's example inputs: output (20 NaN" in err, err
    assert not (tmp_path / ".run.partial").exists()


def test_the_onnx_check_fails_on_nan_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from torchslim.numerics import NumericalError
    from torchslim.onnx_io import check_onnx, export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.rand(2, 1, 8, 8)
    path = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert check_onnx(model, path, (x,), atol=1e-4) < 1e-4
    with torch.no_grad():
        model[1].bias[0] = float("nan")                       # PyTorch NaN; the file is still finite
    with pytest.raises(NumericalError, match="non-finite outputs"):
        check_onnx(model, path, (x,), atol=1e-4)


def test_a_nan_loss_from_nan_weights_says_so_not_lower_the_learning_rate(digits_task):
    import torch

    from torchslim.train import TrainConfig, train
    from torchslim.train.trainer import TrainingDivergedError

    model = torchslim.build_model("zoo:digits-cnn")
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"because weights are non-finite: 0.weight \(1 NaN, 0 inf\); "
                                                    "they were so before training"):
        train(model, digits_task, TrainConfig(epochs=1, loggers=()))


def test_an_edited_architecture_in_a_manifest_is_refused_before_allocation(tmp_path):
    """Builder arguments of a manifest take effect on the meta device: a width of 50,000 costs
    nothing before the shapes are compared with the stored tensors."""
    torchslim.save(torchslim.build_model("zoo:digits-cnn"), tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["source"]["args"] = {"channels": [50_000, 50_000], "hidden": 50_000}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(torchslim.errors.ArtifactError, match=r"the model expects \(50000, 1, 3, 3\)"):
        torchslim.load(tmp_path / "a")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024   # KiB: far below 2.5e9 params
