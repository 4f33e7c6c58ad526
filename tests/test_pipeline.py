"""End to end: the demo, metrics.json against the contract, reproducibility, measurement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import torchslim
import torchslim.errors
from torchslim.measure import count_macs, count_params

STEP_KEYS = {"name", "verb", "method", "params", "nonzero_params", "size_bytes", "macs", "latency_ms",
             "metric", "wall_s"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    # a real process, as a newcomer runs it (its speed is a benchmark figure, not asserted here)
    r = subprocess.run([sys.executable, "-m", "torchslim", "demo", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_demo_meets_its_promises(demo_run):
    out, stdout = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["steps"]
    base, final = steps[0], steps[-1]
    assert base["name"] == "baseline" and base["metric"]["value"] >= 0.97
    assert base["size_bytes"] / final["size_bytes"] >= 4.0
    assert final["metric"]["value"] >= base["metric"]["value"] - 0.01
    # the artifact reloads to the same accuracy
    model = torchslim.load(out / "model")
    acc = torchslim.build_task("digits").evaluate(model)
    assert acc == pytest.approx(final["metric"]["value"], abs=1e-6)
    # the console shows the before/after table
    assert "baseline" in stdout and "size x" in stdout and "reloaded" in stdout
    for f in ("recipe.yaml", "report.md", "report.html", "onnx/model.onnx", "model/manifest.json"):
        assert (out / f).is_file(), f
    assert not list(out.parent.glob(".run.*")), "temporary directories left behind"
    # training curves of every training stage as TensorBoard event files under DIR/logs
    for stage in ("baseline", "distill", "prune-gradual"):
        assert list((out / "logs" / stage).glob("events.out.tfevents.*")), stage


def test_metrics_json_follows_the_contract(demo_run):
    out, _ = demo_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema_version"] == 1 and m["torchslim_version"] == torchslim.__version__
    assert m["model"] == "zoo:digits-cnn" and m["task"] == "digits"
    assert {"torch", "threads", "device", "cpu", "world_size"} <= set(m["environment"])
    assert m["environment"]["world_size"] == 1
    for s in m["steps"]:
        assert STEP_KEYS <= set(s), STEP_KEYS - set(s)
        assert set(s["latency_ms"]) == {"1", "32"} and all(v > 0 for v in s["latency_ms"].values())
        assert s["metric"]["name"] == "accuracy" and s["metric"]["higher_is_better"] is True
        assert 0 < s["nonzero_params"] <= s["params"]
    # size_bytes is the real size on disk of each step's saved artifact
    for i, s in enumerate(m["steps"]):
        d = next((out / "steps").glob(f"{i:02d}-*"))
        on_disk = sum(f.stat().st_size for f in (d / "model").rglob("*") if f.is_file())
        assert s["size_bytes"] == on_disk
    assert m["steps"][0]["verb"] == "baseline" and m["steps"][0]["method"] is None
    # how raw digits become the inputs, in metrics.json, the artifact and the ONNX file
    from torchslim.artifact import read_preprocessing
    from torchslim.onnx_io import onnx_session

    pre = torchslim.build_task("digits").preprocessing
    assert m["preprocessing"] == pre and read_preprocessing(out / "model") == pre
    meta = onnx_session(out / "onnx" / "model.onnx").get_modelmeta().custom_metadata_map
    assert json.loads(meta["torchslim.preprocessing"]) == pre


def test_saved_recipe_reproduces_the_run(tmp_path):
    recipe = {"model": "zoo:digits-cnn", "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 3, "lr": 0.003, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.6,
                                   "finetune": {"epochs": 1, "lr": 0.001, "loggers": []}}},
                        {"quantize": {"method": "linear"}}]}
    m1 = torchslim.compress(recipe, tmp_path / "a")
    m2 = torchslim.compress(tmp_path / "a" / "recipe.yaml", tmp_path / "b")
    for s1, s2 in zip(m1["steps"], m2["steps"]):
        for k in ("params", "nonzero_params", "size_bytes", "macs", "metric"):
            assert s1[k] == s2[k], (s1["name"], k)
    assert (tmp_path / "a" / "recipe.yaml").read_text() == (tmp_path / "b" / "recipe.yaml").read_text()


def test_count_params_and_macs_against_hand_counts():
    m = torchslim.build_model("zoo:lenet-5")
    assert count_params(m) == (431080, 431080)
    # conv1: 20*24*24*25, conv2: 50*8*8*(20*25), fc1: 800*500, fc2: 500*10
    expected = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_macs(m, (torch.zeros(1, 1, 28, 28),)) == expected


def test_macs_count_attention_matmuls():
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    L = 10
    # projections: q,k,v,out (4 * L*32*32) + ffn (2 * L*32*64) + scores and values (2 * L*L*32)
    expected = 4 * L * 32 * 32 + 2 * L * 32 * 64 + 2 * L * L * 32
    assert count_macs(layer, (torch.zeros(1, L, 32),)) == expected


def test_measure_cli_json(tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "torchslim", "measure", "zoo:lenet-300-100", "--task",
                        "shape:1x28x28", "--batch-sizes", "1,4", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())
    assert row["params"] == 266610 and row["metric"] is None
    assert row["macs"] == 784 * 300 + 300 * 100 + 100 * 10
    assert set(row["latency_ms"]) == {"1", "4"}


def test_export_cli_from_a_run_dir(demo_run, tmp_path):
    out, _ = demo_run
    target = tmp_path / "again.onnx"
    r = subprocess.run([sys.executable, "-m", "torchslim", "export", str(out), "--format", "onnx",
                        "--out", str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "unused functions" not in r.stderr  # the ONNX libraries' INFO logs stay out of the CLI's output
    import onnxruntime as ort
    sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torchslim.build_task("digits").example_inputs(5)[0]
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = torchslim.load(out / "model")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the run's model/ folder alone: the task comes from the run's metrics.json beside it
    again = tmp_path / "model-dir.onnx"
    r = subprocess.run([sys.executable, "-m", "torchslim", "export", str(out / "model"), "--format", "onnx",
                        "--out", str(again)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == target.read_bytes()


def test_apply_underscore_works_in_place():
    from torchslim.methods.prune.magnitude import MagnitudePruneConfig
    m = torchslim.build_model("zoo:lenet-300-100")
    same = torchslim.apply_(m, MagnitudePruneConfig(sparsity=0.5))
    assert same is m and float((m[1].weight == 0).float().mean()) > 0.3


def test_methods_command_lists_fields():
    r = subprocess.run([sys.executable, "-m", "torchslim", "methods"], capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("prune.magnitude", "quantize.linear", "distill.logits", "train.sgd", "export.default"):
        assert key in r.stdout
    assert "sparsity: float = 0.5" in r.stdout
    # each train method lists its own optimizer and learning rate
    adamw = r.stdout.split("train.adamw", 1)[1].split("train.sgd", 1)[0]
    assert 'optimizer: str = "adamw"' in adamw and "lr: float = 0.001" in adamw


def test_macs_count_cpu_sdpa_attention():
    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.zeros(1, 4, 10, 8)       # (B, heads, L, head_dim)
    # scores Q K^T and the weighted sum with V: 2 * B*h*L*L*d
    assert count_macs(Attn(), (q, q, q)) == 2 * 4 * 10 * 10 * 8


def test_repeated_steps_get_unique_names():
    from torchslim.pipeline import step_name
    from torchslim.recipe import Recipe
    r = Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits", "steps": [
        {"prune": {"method": "magnitude", "sparsity": 0.3}}, {"quantize": {"method": "linear"}},
        {"prune": {"method": "magnitude", "sparsity": 0.5}}]})
    assert [step_name(r, i) for i in range(4)] == ["baseline", "prune-magnitude", "quantize-linear",
                                                   "prune-magnitude-2"]


def crash_first_quantize(monkeypatch) -> list[str]:
    """Make the first quantize step of a run raise (a crash after the earlier steps finished);
    returns the list of step keys applied, which grows as the run goes."""
    import torchslim.pipeline as pl

    real_apply, calls = pl.apply_step, []

    def flaky(model, step, ctx):
        calls.append(step.key)
        if step.verb == "quantize" and calls.count(step.key) == 1:
            raise RuntimeError("simulated crash in step 2")
        return real_apply(model, step, ctx)

    monkeypatch.setattr(pl, "apply_step", flaky)
    return calls


def test_resume_after_a_failed_step_skips_finished_steps(tmp_path, monkeypatch):
    recipe = {"model": "zoo:digits-cnn", "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 2, "lr": 0.003, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "linear"}}]}
    calls = crash_first_quantize(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        torchslim.compress(recipe, out)
    assert not out.exists() and (tmp_path / ".run.partial" / "steps" / "01-prune-magnitude" / "step.json").is_file()
    with pytest.raises(torchslim.errors.UserError, match="--resume"):
        torchslim.compress(recipe, out)
    first_rows = json.loads((tmp_path / ".run.partial" / "metrics.json").read_text())["steps"]
    m = torchslim.compress(recipe, out, resume=True)
    assert calls == ["prune.magnitude", "quantize.linear", "quantize.linear"]   # prune ran once
    assert m["steps"][:2] == first_rows and [s["name"] for s in m["steps"]][2] == "quantize-linear"
    assert torchslim.load(out / "model") is not None and not (tmp_path / ".run.partial").exists()


def test_resume_takes_changed_steps_after_the_last_finished_one(tmp_path, monkeypatch):
    """The baseline and the prune step finished, the quantize step crashed: a resume may change
    the quantize step (it runs with the new settings) but not a finished step."""
    import copy

    recipe = {"model": "zoo:digits-cnn", "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 2, "lr": 0.003, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                        {"quantize": {"method": "linear", "bits": 8}}]}
    calls = crash_first_quantize(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        torchslim.compress(recipe, out)
    finished = json.loads((tmp_path / ".run.partial" / "metrics.json").read_text())["steps"]

    changed_prune = copy.deepcopy(recipe)
    changed_prune["steps"][0]["prune"]["sparsity"] = 0.6
    with pytest.raises(torchslim.errors.UserError,
                       match=r"step 1 \(prune-magnitude\) already finished with other settings "
                             r"\(steps.0.prune.sparsity: 0.5 -> 0.6\)"):
        torchslim.compress(changed_prune, out, resume=True)

    changed_quant = copy.deepcopy(recipe)
    changed_quant["steps"][1]["quantize"]["bits"] = 4
    m = torchslim.compress(changed_quant, out, resume=True)
    assert calls == ["prune.magnitude", "quantize.linear", "quantize.linear"]   # baseline, prune kept
    assert m["steps"][:2] == finished and m["steps"][2]["config"]["bits"] == 4
    assert "bits: 4" in (out / "recipe.yaml").read_text()
    assert torchslim.load(out / "model")[0].bits == 4


def test_transformer_recipe_end_to_end(tmp_path, data_root):
    """A Hugging Face encoder through the whole pipeline: prune, int8, ONNX, reload."""
    transformers = pytest.importorskip("transformers")
    if not (data_root / "stsbenchmark").is_dir():
        pytest.skip("STS Benchmark files not found")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    recipe = {"model": f"hf:{tmp_path / 'bert'}", "task": "stsb", "steps": [
        {"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "layer", "targets": ["re:encoder.*"]}},
        {"quantize": {"method": "linear", "targets": ["re:encoder.*"]}},
        {"export": {"formats": ["artifact", "onnx"]}}]}
    m = torchslim.compress(recipe, tmp_path / "run", data_dir=str(data_root))
    names = [s["name"] for s in m["steps"]]
    assert names == ["baseline", "prune-magnitude", "quantize-linear", "export"]
    assert all(s["metric"]["name"] == "spearman" for s in m["steps"])
    assert m["steps"][2]["size_bytes"] < m["steps"][1]["size_bytes"] < m["steps"][0]["size_bytes"]
    assert m["steps"][3]["onnx_max_abs_diff"] < 1e-3
    back = torchslim.load(tmp_path / "run" / "model")
    task = torchslim.build_task("stsb", str(data_root))
    assert task.evaluate(back) == pytest.approx(m["steps"][-1]["metric"]["value"], abs=1e-6)


def test_step_folders_carry_the_step_names_of_metrics(tmp_path):
    """A verb and method that come again: the folder of the second is NN-prune-magnitude-2, the
    name its row has, and --resume reads the folders under the same names."""
    from torchslim.pipeline import OutputDir, _stage_dirs, _stages
    from torchslim.recipe import Recipe

    prune = {"prune": {"method": "magnitude", "sparsity": 0.3}}
    recipe = {"model": "zoo:digits-cnn", "task": "digits", "measure": {"batch_sizes": [1], "latency": False},
              "steps": [prune, {"prune": {"method": "threshold", "alpha": 0.1}},
                        {"prune": {"method": "magnitude", "sparsity": 0.5}}]}
    m = torchslim.compress(recipe, tmp_path / "run")
    names = [s["name"] for s in m["steps"]]
    assert names == ["baseline", "prune-magnitude", "prune-threshold", "prune-magnitude-2"]
    folders = sorted(p.name for p in (tmp_path / "run" / "steps").iterdir())
    assert folders == [f"{i:02d}-{n}" for i, n in enumerate(names)]
    r = Recipe.from_dict(recipe)
    assert _stage_dirs(_stages(r.to_dict())) == folders
    assert [OutputDir(r, tmp_path, tmp_path, False)._dir(i).name for i in range(4)] == folders
    long = Recipe.from_dict({**recipe, "steps": [prune] * 101})        # three-digit step numbers
    dirs = [OutputDir(long, tmp_path, tmp_path, False)._dir(i).name for i in range(102)]
    assert dirs == _stage_dirs(_stages(long.to_dict())) and dirs[101] == "101-prune-magnitude-101"


def test_drop_checkpoints_keeps_only_step_rows_and_model_folder_is_not_private(tmp_path):
    import os
    import stat

    recipe = {"model": "zoo:digits-cnn", "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 1, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5,
                                   "finetune": {"optimizer": "adamw", "epochs": 1, "loggers": []}}}],
              "measure": {"batch_sizes": [1], "latency": False}}
    kept = torchslim.compress(recipe, tmp_path / "kept")
    assert (tmp_path / "kept" / "steps" / "01-prune-magnitude" / "model" / "manifest.json").is_file()
    assert (tmp_path / "kept" / "steps" / "01-prune-magnitude" / "train" / "last.pt").is_file()
    m = torchslim.compress(recipe, tmp_path / "run", keep_checkpoints=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00-baseline", "01-prune-magnitude"]
    assert all([f.name for f in d.iterdir()] == ["step.json"] for d in (out / "steps").iterdir())
    assert m["steps"][1]["nonzero_params"] == kept["steps"][1]["nonzero_params"]
    assert torchslim.load(out / "model") is not None
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model").stat().st_mode) == 0o777 & ~umask


def test_log_lines_name_the_final_paths_not_the_temporary_directory(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    recipe = {"model": "zoo:digits-cnn", "task": "digits", "steps": [{"export": {"formats": ["artifact", "onnx"]}}],
              "measure": {"batch_sizes": [1], "latency": False}}
    with caplog.at_level("INFO"):
        torchslim.compress(recipe, tmp_path / "run")
    assert f"exported {tmp_path / 'run' / 'onnx' / 'model.onnx'} (max abs diff" in caplog.text
    assert ".partial" not in caplog.text and (tmp_path / "run" / "onnx" / "model.onnx").is_file()


def test_methods_takes_a_verb_alone(capsys):
    from torchslim.cli import main

    assert main(["methods", "prune"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("prune.")]
    assert {"prune.magnitude", "prune.taylor", "prune.random"} <= set(listed) and "quantize." not in out
    assert listed == sorted(listed)
