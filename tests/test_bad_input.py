"""Bad input: exit code 2, one clear ``error:`` line, nothing half-written, inputs untouched."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchslim
from torchslim.cli import main

GOOD = """\
model: zoo:digits-cnn
task: digits
train: {epochs: 1, lr: 0.003, optimizer: adamw}
steps:
  - prune: {method: magnitude, sparsity: 0.5}
  - quantize: {method: linear, bits: 8}
"""


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_clean_error(code, err, out_dir: Path | None, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) <= 3, f"error message too long:\n{err}"
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    if out_dir is not None:
        assert not out_dir.exists(), "nothing may be written on bad input"
        assert not any(p.name.startswith(f".{out_dir.name}.") for p in out_dir.parent.iterdir())


@pytest.mark.parametrize("text,needles", [
    (GOOD.replace("magnitude", "magnitud"), ["did you mean 'magnitude'", ":5:"]),
    (GOOD.replace("sparsity: 0.5", "sparsty: 0.5"), ["unknown key 'sparsty'", "did you mean 'sparsity'", ":5:"]),
    (GOOD.replace("sparsity: 0.5", "sparsity: 1.5"), ["sparsity", "1.5", "out of range", "[0.0, 1.0)"]),
    (GOOD.replace("bits: 8", "bits: 0"), ["bits", "out of range", ":6:"]),
    (GOOD.replace("prune:", "prun:"), ["unknown step verb 'prun'", "did you mean 'prune'"]),
    (GOOD.replace("train:", "trian:"), ["unknown recipe key", "did you mean 'train'"]),
    (GOOD.replace("{epochs: 1,", "{epochs: [1,"), ["YAML syntax error", ":3:"]),
    (GOOD.replace("zoo:digits-cnn", "zoo:digit-cnn"), ["unknown zoo model 'digit-cnn'", "did you mean 'digits-cnn'"]),
    (GOOD.replace("zoo:digits-cnn", "nope:thing"), ["unknown model source 'nope'"]),
    (GOOD.replace("task: digits", "task: digitz"), ["unknown task", "did you mean 'digits'"]),
    (GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, targets: ['fc9']}"), ["matches no module", "fc9", ":5:"]),
    (GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, targets: ['re:(']}"), ["bad regular expression"]),
    (GOOD.replace("epochs: 1", "epochs: one"), ["epochs", "expected an integer"]),
])
def test_bad_recipes(tmp_path, capsys, text, needles):
    recipe = write(tmp_path, text)
    out = tmp_path / "out"
    code, _, err = run_cli(["compress", recipe, "--out", out], capsys)
    assert_clean_error(code, err, out, *needles)
    # --dry-run validates the same way
    code, _, err = run_cli(["compress", recipe, "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: ")


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    recipe = write(tmp_path, GOOD)
    code, out, err = run_cli(["compress", recipe, "--dry-run", "--set", "steps.0.prune.sparsity=0.75"], capsys)
    assert code == 0, err
    assert "sparsity: 0.75" in out and "01 prune.magnitude" in out and "02 quantize.linear" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("item,needle", [("steps.5.prune.sparsity=0.3", "not an index"),
                                         ("nokey", "expected KEY=VALUE"),
                                         ("steps.0.prune.sparsity=2", "out of range")])
def test_bad_set_overrides(tmp_path, capsys, item, needle):
    recipe = write(tmp_path, GOOD)
    code, _, err = run_cli(["compress", recipe, "--out", tmp_path / "o", "--set", item], capsys)
    assert_clean_error(code, err, tmp_path / "o", needle)


def test_missing_data_files_name_the_path(tmp_path, capsys):
    recipe = write(tmp_path, GOOD.replace("task: digits", "task: mnist"))
    empty = tmp_path / "empty-data"
    empty.mkdir()
    code, _, err = run_cli(["compress", recipe, "--out", tmp_path / "o", "--data-dir", empty], capsys)
    assert_clean_error(code, err, tmp_path / "o", str(empty / "mnist"), "train-images-idx3-ubyte.gz")


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_cli(["compress", tmp_path / "nope.yaml", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "nope.yaml")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_weights_are_refused_and_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": _Evil()}, evil)           # a pickle that would run a command
    code, _, err = run_cli(["measure", "zoo:digits-cnn", "--task", "digits", "--weights", evil], capsys)
    assert_clean_error(code, err, None, "refused", "weights_only")
    assert not marker.exists(), "the pickle was executed"
    # a plain pickle (not a torch.save zip) is refused too
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    code, _, err = run_cli(["measure", "zoo:digits-cnn", "--task", "digits", "--weights", raw], capsys)
    assert code == 2 and not marker.exists()


def test_weights_that_do_not_fit(tmp_path, capsys):
    w = tmp_path / "lenet.pt"
    torch.save(torchslim.build_model("zoo:lenet-5").state_dict(), w)
    code, _, err = run_cli(["measure", "zoo:digits-cnn", "--task", "digits", "--weights", w], capsys)
    assert_clean_error(code, err, None, "do not fit")


@pytest.fixture
def artifact(tmp_path):
    m = torchslim.build_model("zoo:digits-cnn")
    torchslim.save(m, tmp_path / "art")
    return tmp_path / "art"


def _measure_artifact(path, capsys):
    return run_cli(["measure", f"artifact:{path}", "--task", "digits", "--batch-sizes", "1"], capsys)


def test_good_artifact_measures(artifact, capsys):
    code, out, err = _measure_artifact(artifact, capsys)
    assert code == 0, err
    assert "accuracy" in out


def test_truncated_artifact(artifact, capsys):
    f = artifact / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = _measure_artifact(artifact, capsys)
    assert_clean_error(code, err, None, "checksum mismatch")


def test_tampered_artifact(artifact, capsys):
    f = artifact / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF                                      # same size, one byte changed
    f.write_bytes(bytes(data))
    code, _, err = _measure_artifact(artifact, capsys)
    assert_clean_error(code, err, None, "checksum mismatch")


def test_future_artifact_version_refused(artifact, capsys):
    mf = artifact / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["format_version"] = 99
    mf.write_text(json.dumps(manifest))
    code, _, err = _measure_artifact(artifact, capsys)
    assert_clean_error(code, err, None, "format version 99", "upgrade torchslim")


def test_corrupt_manifest_refused(artifact, capsys):
    (artifact / "manifest.json").write_text("{not json")
    code, _, err = _measure_artifact(artifact, capsys)
    assert_clean_error(code, err, None, "corrupt manifest")


def test_unknown_module_class_in_manifest(artifact, capsys):
    mf = artifact / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["edits"] = [{"op": "module", "target": "0", "class": "evil.Module", "args": {}}]
    mf.write_text(json.dumps(manifest))
    code, _, err = _measure_artifact(artifact, capsys)
    assert_clean_error(code, err, None, "evil.Module")


def test_existing_output_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["compress", write(tmp_path, GOOD), "--out", out], capsys)
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_usage_errors_exit_2(capsys):
    """In process (argparse exits through SystemExit); one real process checks the entry point."""
    for args in (["compress", "x.yaml"], ["frobnicate"], ["measure", "zoo:lenet-5"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and "see 'torchslim" in err, (args, err)
    r = subprocess.run([sys.executable, "-m", "torchslim", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_every_command_has_help(capsys):
    for cmd in ("demo", "compress", "measure", "report", "export", "methods", "layers"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0 and "usage:" in capsys.readouterr().out, cmd


def test_bad_builder_arguments(tmp_path, capsys):
    recipe = write(tmp_path, 'model: {spec: "zoo:digits-cnn", args: {channels: "abc"}}\ntask: digits\n')
    code, _, err = run_cli(["compress", recipe, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "zoo:digits-cnn", "cannot build")


def test_training_on_a_task_without_data_fails_before_any_work(tmp_path, capsys):
    recipe = write(tmp_path, GOOD.replace("task: digits", "task: shape:1x8x8"))
    code, _, err = run_cli(["compress", recipe, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "random inputs only")


def test_missing_onnx_runtime_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    recipe = write(tmp_path, GOOD + "  - export: {formats: [artifact, onnx]}\n")
    code, _, err = run_cli(["compress", recipe, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "onnxruntime", "torchslim[onnx]", ":7:")


# -- regressions from review: each was an exit 1 (internal failure) or a late failure -------------
@pytest.mark.parametrize("item,needle", [
    ("steps.0.prune.sparsity=.nan", "finite number"),
    ("measure.batch_sizes=[0]", "out of range"),
    ("model.args={num_classes: -1}", "cannot build"),
])
def test_bad_values_caught_before_any_work(tmp_path, capsys, item, needle):
    code, _, err = run_cli(["compress", write(tmp_path, GOOD), "--out", tmp_path / "o", "--set", item], capsys)
    assert_clean_error(code, err, tmp_path / "o", needle)


def test_exponent_without_dot_is_a_number(tmp_path, capsys):
    """Regression: YAML 1.1 reads 1e-3 as a string, which was refused as 'expected a number'."""
    code, out, err = run_cli(["compress", write(tmp_path, GOOD.replace("lr: 0.003", "lr: 3e-3")), "--dry-run"],
                             capsys)
    assert code == 0, err
    assert "lr: 0.003" in out


@pytest.mark.parametrize("text,needle", [
    ("model: zoo:digits-cnn\ntask: digits\ntask: mnist\n", "appears twice"),
    ("model: &a [*a]\ntask: digits\n", "the YAML refers to itself"),
    ("model: {}\ntask: digits\n", "model.spec: missing"),
    ("model: zoo:digits-cnn\ntask: mnist:foo\n", "takes no argument"),
    ("model: zoo:digits-cnn\ntask: digits\nsteps:\n  - prune: {methd: magnitude}\n", "did you mean 'method'"),
    ("model: zoo:lenet-5\ntask: digits\n", "does not run on the inputs of task 'digits'"),
    ("model: {spec: 'torchvision:resnet18', args: {num_classes: -1}}\ntask: digits\n", "cannot build"),
    ("model: zoo:digits-cnn\ntask: digits\ntrain: {epochs: 1}\n"
     "steps:\n  - distill: {method: logits, student: zoo:digits-cnnn}\n", "did you mean 'digits-cnn'"),
    ("model: zoo:digits-cnn\ntask: digits\ntrain: {epochs: 1}\n"
     "steps:\n  - distill: {method: logits, student: zoo:lenet-5}\n", "student zoo:lenet-5 does not run"),
])
def test_more_bad_recipes(tmp_path, capsys, text, needle):
    code, _, err = run_cli(["compress", write(tmp_path, text), "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", needle)


def test_non_utf8_recipe(tmp_path, capsys):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe model")
    code, _, err = run_cli(["compress", bad, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "not a UTF-8")


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep")
    code, _, err = run_cli(["compress", write(tmp_path, GOOD), "--out", f], capsys)
    assert code == 2 and "not a directory" in err and f.read_text() == "keep"


def test_measure_model_that_does_not_fit_task(capsys):
    code, _, err = run_cli(["measure", "zoo:lenet-300-100", "--task", "shape:10"], capsys)
    assert_clean_error(code, err, None, "does not run on the inputs", "int64")


def test_methods_pattern_that_matches_nothing(capsys):
    code, _, err = run_cli(["methods", "prune.magnitud"], capsys)
    assert code == 2 and "did you mean 'prune.magnitude'" in err


def test_export_opset_out_of_range():
    r = subprocess.run([sys.executable, "-m", "torchslim", "export", ".", "--opset", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "13 to 23" in r.stderr


@pytest.mark.parametrize("where", ["train", "finetune"])
def test_logger_not_installed_is_caught_before_any_work(tmp_path, capsys, monkeypatch, where):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    text = GOOD.replace("optimizer: adamw}", "optimizer: adamw, loggers: [mlflow]}") if where == "train" else \
        GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, finetune: {epochs: 1, loggers: [mlflow]}}")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", "'mlflow' is named but not installed")


def test_every_recipe_error_is_reported_at_once(tmp_path, capsys):
    text = (GOOD.replace("lr: 0.003", "lr: -1, optimiser: sgd").replace("sparsity: 0.5", "sparsity: 1.5, scope: globl")
            + "  - quantize: {method: lineer}\n")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--out", tmp_path / "out"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 5 and all(ln.startswith("error: ") for ln in lines), err
    assert ":3: train: unknown key 'optimiser'" in lines[0] and ":3: train.lr" in lines[1]  # same mapping
    assert ":5: steps.0.prune.sparsity" in lines[2] and "steps.0.prune.scope: 'globl'" in lines[3]
    assert ":7: steps.2.quantize.method" in lines[4] and "did you mean 'linear'" in lines[4]


def test_group_size_that_does_not_divide_a_layer_fails_the_dry_run(tmp_path, capsys):
    """Checks that need the model's shapes but not trained weights run before any training."""
    text = GOOD.replace("bits: 8}", "bits: 4, granularity: group, group_size: 7}")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: ") and ":6: steps.1.quantize" in err, err
    # every offending layer named at once, with its inputs per channel (digits-cnn: 1x3x3 conv, ...)
    assert "4 targeted layer(s): 0 (9), 2 (288), 6 (1024), 9 (128)" in err
    out = tmp_path / "out"
    code, _, err = run_cli(["compress", write(tmp_path, text), "--out", out], capsys)
    assert_clean_error(code, err, out, "group_size: 7 does not divide")


def test_debug_shows_the_traceback_inside_the_users_own_code(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)) / self.missing_scale\n"
        "def build():\n"
        "    return Net()\n"
        "def broken():\n"
        "    raise RuntimeError('width must be even')\n")
    for factory, line, needle in (("build", 7, "missing_scale"), ("broken", 11, "width must be even")):
        args = ["measure", f"py:{tmp_path / 'mine.py'}:{factory}", "--task", "digits", "--batch-sizes", "1"]
        code, _, err = run_cli(args, capsys)
        assert_clean_error(code, err, None, needle)
        code, _, err = run_cli(args + ["--debug"], capsys)
        assert code == 2 and f'mine.py", line {line}' in err, err   # the user's frame is shown


def test_demo_resumes_and_trust_flag_is_offered(tmp_path, capsys, monkeypatch):
    """An interrupted demo's advice (--resume) is an option demo takes; the trust refusal names
    the command line flag."""
    import torchslim.demo as demo

    monkeypatch.setattr(demo, "run_recipe", lambda recipe, out, **kw: (_ for _ in ()).throw(
        torchslim.errors.UserError(f"resume={kw['resume']}")))
    code, _, err = run_cli(["demo", "--out", tmp_path / "d", "--resume"], capsys)
    assert code == 2 and "error: resume=True" in err
    from torchslim.artifact import TRUST_ENV
    monkeypatch.delenv(TRUST_ENV, raising=False)
    (tmp_path / "arch.py").write_text("import torch\ndef net():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                                      "torch.nn.Linear(64, 10))\n")
    model = torchslim.build_model(f"py:{tmp_path / 'arch.py'}:net")
    torchslim.save(model, tmp_path / "art")
    code, _, err = run_cli(["measure", f"artifact:{tmp_path / 'art'}", "--task", "digits",
                            "--batch-sizes", "1"], capsys)
    assert_clean_error(code, err, None, "pass --trust-code (command line)")
    code, out, err = run_cli(["measure", f"artifact:{tmp_path / 'art'}", "--task", "digits",
                              "--batch-sizes", "1", "--trust-code"], capsys)
    assert code == 0, err
    # the flag trusted code for that call only: the next in-process call is refused again
    assert TRUST_ENV not in os.environ
    code, _, err = run_cli(["measure", f"artifact:{tmp_path / 'art'}", "--task", "digits",
                            "--batch-sizes", "1"], capsys)
    assert_clean_error(code, err, None, "pass --trust-code (command line)")
    # -q silences progress bars for its call only; a setting of the caller's own stays as it was
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    code, _, err = run_cli(["methods", "-q"], capsys)
    assert code == 0, err
    assert "TQDM_DISABLE" not in os.environ
    monkeypatch.setenv("TQDM_DISABLE", "yes")
    monkeypatch.setenv(TRUST_ENV, "1")
    code, _, err = run_cli(["methods", "-q"], capsys)
    assert code == 0, err
    assert os.environ["TQDM_DISABLE"] == "yes" and os.environ[TRUST_ENV] == "1"


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nmodel: *a8\ntask: digits\n"        # 9^9 values once expanded


@pytest.mark.parametrize("args,recipe,needle", [
    (["compress", "r.yaml", "--dry-run"], _alias_bomb(), "expands to 100,001 values through its aliases"),
    (["compress", "r.yaml", "--dry-run"], "model: zoo:digits-cnn\ntask: " + "x" * 900_000 + "\n",
     "more characters)"),
    (["compress", "r.yaml", "--dry-run"], "x" * (1 << 20) + "1", "a recipe is at most 1,048,576 bytes"),
    (["compress", "r.yaml", "--dry-run", "--set", "train.lr=" + "[" * 3000 + "]" * 3000], GOOD,
     "nested too deeply"),
    (["compress", "r.yaml", "--dry-run", "--set", "measure.batch_sizes=[1000000000]"], GOOD,
     "accepted: [1, 65536]"),
    (["measure", "zoo:digits-cnn", "--task", "digits", "--batch-sizes", "1000000000"], None,
     "batch sizes must be integers from 1 to 65536"),
    (["measure", "zoo:lenet-5", "--task", "shape:1x100000x100000"], None, "values per example; at most"),
    (["measure", "zoo:lenet-5", "--task", "shape:1x4096x4096", "--batch-sizes", "1,1000"], None,
     "62.5 GiB (limit 4 GiB)"),
    (["compress", "r.yaml", "--bogus"], GOOD, "unrecognized arguments: --bogus"),
    (["measure", "py:ex.py:f", "--task", "digits"], None, "called sys.exit(3)"),
    (["measure", "zoo:digits-cnn", "--task", "py:ex.py:raising"], None,
     "the task factory raised ValueError: no data here"),
    (["compress", "r.yaml", "--dry-run", "--set", "measure.batch_sizes=[]"], GOOD, "give at least one batch size"),
    (["report", "run"], None, "5,000 batch sizes; a report shows at most 64"),
])
def test_hostile_inputs_give_one_bounded_error(tmp_path, monkeypatch, args, recipe, needle):
    """Every bad input: exit 2, a few short ``error:`` lines, in seconds, without a traceback."""
    monkeypatch.chdir(tmp_path)
    if recipe is not None:
        (tmp_path / "r.yaml").write_text(recipe)
    (tmp_path / "ex.py").write_text("import sys\ndef f():\n    sys.exit(3)\n"
                                    "def raising():\n    raise ValueError('no data here')\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"schema_version": 1, "steps": [
        {"name": "baseline", "verb": "baseline", "latency_ms": {str(i): 1.0 for i in range(5000)}}]}))
    r = subprocess.run([sys.executable, "-m", "torchslim", *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines and all(ln.startswith("error: ") for ln in lines), r.stderr[-2000:]
    assert len(r.stderr) < 2000 and len(lines) <= 3 and "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr


def test_internal_failure_message_drops_cpp_frames():
    from torchslim.cli import _first_line

    exc = RuntimeError("bad shape [enforce fail] Exception raised from foo at bar.cpp:12 (most recent call "
                       "first):\nframe #0: c10::Error\nframe #1: at::native")
    assert _first_line(exc) == "bad shape [enforce fail]"


@pytest.mark.parametrize("step,needle", [
    ("prune: {method: magnitude, targets: ['6', '4']}", "module '4' is a MaxPool2d: it has no weight tensor"),
    ("quantize: {method: linear, targets: ['4', '9']}", "module '4' is a MaxPool2d: no quantized layer exists"),
])
def test_named_module_a_method_cannot_handle_fails_before_any_work(tmp_path, capsys, step, needle):
    """A module named in targets is never skipped in silence: refused, naming it and its class,
    before the baseline trains."""
    text = f"model: zoo:digits-cnn\ntask: digits\ntrain: {{epochs: 1}}\nsteps:\n  - {step}\n"
    code, _, err = run_cli(["compress", write(tmp_path, text), "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, tmp_path / "o", needle, ":5:")


@pytest.mark.parametrize("item,needle", [
    ("train.epochs=" + "1" + "0" * 400, "accepted: [0, 100000]"),
    ("train.batch_size=1000000000000000000000000000000", "accepted: [1, 65536]"),
])
def test_absurd_training_sizes_are_refused_at_validation(tmp_path, capsys, item, needle):
    code, _, err = run_cli(["compress", write(tmp_path, GOOD), "--dry-run", "--set", item], capsys)
    assert_clean_error(code, err, None, needle)


def test_a_model_with_fewer_outputs_than_the_task_has_classes_is_refused_before_any_work(tmp_path, capsys):
    text = ("model: {spec: zoo:digits-cnn, args: {num_classes: 5}}\ntask: digits\n"
            "train: {epochs: 1, loggers: []}\nsteps:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--dry-run"], capsys)
    assert code == 2 and "outputs 5 class scores, but task 'digits' has 10 classes" in err, err
    five = write(tmp_path, "import torch\n\ndef build():\n"
                           "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))\n", "five.py")
    code, out, err = run_cli(["measure", f"py:{five}:build", "--task", "digits"], capsys)
    assert code == 2 and "outputs 5 class scores" in err and "accuracy" not in out, (out, err)

# -- distillation checked at preflight on the models known then ------------------------------
DIGITS = "model: zoo:digits-cnn\ntask: digits\ntrain: {epochs: 1}\nsteps:\n  - %s\n"
SMALL = "student: {spec: zoo:digits-cnn, args: {channels: [8, 16]}}"
TX = """\
import torch
from torch import nn
class Tx(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)
    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))
def build():
    return Tx()
"""


def _width(spec_args: dict, name: str) -> int:
    """Output channels of module ``name`` of zoo:digits-cnn built with ``spec_args``."""
    from torchslim.specs import build_model
    return dict(build_model("zoo:digits-cnn", args=spec_args).named_modules())[name].out_channels


@pytest.mark.parametrize("step,needles", [
    # a teacher by role is the recipe's model as built
    (f"distill: {{method: hint, teacher: baseline, {SMALL}, layers: {{'2': conv2}}}}",
     ["steps.0.distill: no module named 'conv2' in the teacher"]),
    # hints inside a fine-tune: teacher and student (the model, whose names channel pruning keeps)
    ("prune: {method: magnitude, granularity: channel, sparsity: 0.5, finetune: {epochs: 1, distill: "
     "{teacher: baseline, hint: {layers: {'2': '99'}}}}}", ["no module named '99' in the teacher"]),
    ("prune: {method: magnitude, granularity: channel, sparsity: 0.5, finetune: {epochs: 1, distill: "
     "{teacher: baseline, hint: {layers: {'22': '2'}}}}}", ["no module named '22' in the student"]),
    # output shapes of teachers and student built at preflight
    (f"distill: {{method: logits, teacher: [baseline, {{model: {{spec: zoo:digits-cnn, args: {{num_classes: 12}}}}}}], "
     f"{SMALL}}}", ["the student outputs (2, 10), teacher 2 (of 2) outputs (2, 12)"]),
    ("prune: {method: magnitude, sparsity: 0.5, finetune: {epochs: 1, distill: {teacher: {spec: zoo:digits-cnn, "
     "args: {num_classes: 13}}}}}", ["steps.0.prune: distill: the student outputs (2, 10), the teacher outputs (2, 13)"]),
    ("distill: {method: logits, teacher: baseline, student: {spec: zoo:lenet-300-100, args: {in_features: 64, "
     "num_classes: 12}}}", ["the student outputs (2, 12), the teacher outputs (2, 10)"]),
    # from_teacher needs a stack of layers, which a CNN has not
    ("distill: {method: logits, teacher: baseline, student: {from_teacher: {layers: [0, 1]}}}",
     ["the teacher (Sequential) has no stack of layers"]),
])
def test_distill_problems_fail_the_dry_run(tmp_path, capsys, step, needles):
    """What training would find only after the baseline (names, shapes) fails ``--dry-run``,
    located at the step's line."""
    code, _, err = run_cli(["compress", write(tmp_path, DIGITS % step), "--dry-run"], capsys)
    assert_clean_error(code, err, None, ":5:", *needles)


def test_hint_widths_without_projection_fail_the_dry_run(tmp_path, capsys):
    step = f"distill: {{method: hint, teacher: baseline, {SMALL}, layers: {{'2': '2'}}, projection: none}}"
    code, _, err = run_cli(["compress", write(tmp_path, DIGITS % step), "--dry-run"], capsys)
    s, t = _width({"channels": [8, 16]}, "2"), _width({}, "2")
    assert s != t
    assert_clean_error(code, err, None, ":5:", f"student layer '2' has width {s}, teacher layer '2' {t}")
    # projection auto bridges the widths: the same recipe passes
    code, _, err = run_cli(["compress", write(tmp_path, DIGITS % step.replace("none", "auto")), "--dry-run"], capsys)
    assert code == 0, err


def test_teacher_after_a_structural_step_is_left_to_the_run(tmp_path, capsys):
    """``current`` after channel pruning has shapes preflight does not know: not checked then."""
    text = DIGITS % "prune: {method: magnitude, granularity: channel, sparsity: 0.5}" + (
        f"  - distill: {{method: hint, teacher: current, {SMALL}, layers: {{'2': '2'}}, projection: none}}\n")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--dry-run"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("step,needle", [
    ("distill: {method: logits, teacher: baseline, student: {from_teacher: {layers: [0, 7]}}}",
     "index 7 is out of range: the teacher's encoder.layers has 4 layers (0..3)"),
    ("distill: {method: attention, teacher: baseline, student: {from_teacher: {layers: [0, 2]}}, "
     "layers: {encoder.layers.0.self_attn: encoder.layers.0.self_attn}}",
     "'encoder.layers.0.self_attn' of the student is an nn.MultiheadAttention, which computes no probabilities"),
])
def test_transformer_distill_problems_fail_the_dry_run(tmp_path, capsys, step, needle):
    (tmp_path / "tx.py").write_text(TX)
    text = (DIGITS % step).replace("zoo:digits-cnn", f"py:{tmp_path / 'tx.py'}:build")
    code, _, err = run_cli(["compress", write(tmp_path, text), "--dry-run"], capsys)
    assert_clean_error(code, err, None, ":5:", needle)


def test_sensitivity_file_of_another_granularity_fails_the_dry_run(tmp_path, capsys):
    curves = tmp_path / "sensitivity.json"
    curves.write_text(json.dumps({"schema": 1, "granularity": "head", "layers": {}}))
    step = (f"prune: {{method: magnitude, granularity: channel, ratios: sensitivity, sparsity: 0.5, "
            f"sensitivity: {curves}}}")
    code, _, err = run_cli(["compress", write(tmp_path, DIGITS % step), "--dry-run"], capsys)
    assert_clean_error(code, err, None, ":5:", "holds 'head' curves; this step prunes granularity 'channel'",
                       "--granularity channel")


@pytest.mark.parametrize("teacher,needle", [
    ("[{model: baseline, wieght: 0.5}]", "teacher[0]: unknown key 'wieght' (did you mean 'weight'?)"),
    ("[{model: baseline, weight: -1}]", "teacher[0].weight: -1.0 is out of range; accepted: (0.0, inf]"),
    ("[baseline, basline]", "teacher[1].model: 'basline' is neither a teacher role (did you mean 'baseline'?)"),
])
def test_errors_inside_a_teacher_list_keep_their_detail(tmp_path, capsys, teacher, needle):
    step = f"distill: {{method: logits, teacher: {teacher}, {SMALL}}}"
    code, _, err = run_cli(["compress", write(tmp_path, DIGITS % step), "--dry-run"], capsys)
    assert_clean_error(code, err, None, ":5:", needle)


@pytest.mark.parametrize("config,advice", [
    ({"finetune": {"epochs": 0}}, "finetune: {epochs: N}"),
    ({"train": {"epochs": 1}, "student": "zoo:digits-cnn"}, "more epochs in the step's train: {epochs: N}"),
])
def test_metric_drop_advice_fits_the_step(config, advice):
    from torchslim.pipeline import metric_warnings
    row = {"name": "step", "verb": "x", "config": config,
           "metric": {"name": "accuracy", "value": 0.5, "higher_is_better": True}}
    found = metric_warnings(row, [{"metric": {"value": 0.9}}], None, 0.05)
    assert [w["code"] for w in found] == ["metric_drop"]
    assert advice in found[0]["message"] and "0.4000 lost" in found[0]["message"]
    assert ("finetune:" in found[0]["message"]) == ("finetune" in config)


@pytest.mark.parametrize("key", ["ignore", "targets"])
def test_a_pattern_matching_nothing_is_reported_once_under_its_own_key(tmp_path, capsys, key):
    """Channel pruning checks its targets again (the classes it handles): a pattern that matches
    no module is one error, named by the key that holds it."""
    recipe = write(tmp_path, GOOD.replace("sparsity: 0.5}", f"sparsity: 0.5, granularity: channel, {key}: ['re:fc.*']}}"))
    code, _, err = run_cli(["compress", recipe, "--dry-run"], capsys)
    assert code == 2 and err.count("matches no module") == 1, err
    assert f"steps.0.prune.{key}: pattern 're:fc.*'" in err


def test_sensitivity_refuses_what_it_cannot_vary_before_building_anything(tmp_path, capsys):
    for args, needle in ((["--granularity", "layer"], "drops a layer whole"),
                         (["--method", "threshold"], "no sparsity to vary"),
                         (["--granularity", "2:4"], "N:M pattern")):
        code, _, err = run_cli(["sensitivity", "zoo:digits-cnn", "--task", "digits", "--out", tmp_path / "s", *args],
                               capsys)
        assert_clean_error(code, err, tmp_path / "s", needle)
