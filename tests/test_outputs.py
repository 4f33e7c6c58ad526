"""Models returning tuples, dicts and namedtuples; modules torchslim did not build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.errors import ArtifactError
from torchslim.outputs import OutputError, get_output, set_output
from torchslim.train import TrainConfig, train

ASSETS = Path(__file__).parent / "assets"


def _spec(tmp_path: Path, factory: str) -> str:
    f = tmp_path / "multi_output.py"
    if not f.exists():
        shutil.copyfile(ASSETS / "multi_output.py", f)
    return f"py:{f}:{factory}"


def _recipe(spec: str, out_dir: Path, output=None, steps=None) -> dict:
    model = {"spec": spec} if output is None else {"spec": spec, "output": output}
    return {"model": model, "task": "digits",
            "train": {"epochs": 2, "lr": 0.01, "optimizer": "adamw", "loggers": []},
            "measure": {"batch_sizes": [1], "latency": False},
            "steps": steps or [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}


def test_ambiguous_tuple_is_refused_before_training(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(_spec(tmp_path, "tuple_net"), tmp_path)))
    code = main(["compress", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tuple of 2: [0] Tensor(2x10), [1] Tensor(2x16)" in err and "output: 0" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_ambiguous_in_train_mode_only_is_refused_before_training(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(_spec(tmp_path, "train_tuple_net"), tmp_path)))
    assert main(["compress", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "(in train mode) returns tuple of 2: [0] Tensor(2x10), [1] Tensor(2x16)" in err
    assert not (tmp_path / ".run.partial").exists()
    (tmp_path / "r.yaml").write_text(json.dumps(_recipe(_spec(tmp_path, "train_tuple_net"), tmp_path,
                                                        output=0)))
    assert main(["compress", str(recipe), "--out", str(tmp_path / "run")]) == 0


def test_selected_output_trains_prunes_and_survives_save_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    torch.manual_seed(0)
    m = torchslim.compress(_recipe(_spec(tmp_path, "tuple_net"), tmp_path, output=0,
                                   steps=[{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                          {"export": {"formats": ["onnx"]}}]), tmp_path / "run")
    assert m["steps"][0]["metric"]["value"] > 0.6  # trained on the logits, not the features
    # the selector is recorded and the artifact keeps it after its folder moved
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run" / "model", moved)
    (tmp_path / "multi_output.py").unlink()
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["source"]["output"] == 0 and "source.py" in manifest["files"]
    # size_bytes counts the model's files, not the copied code (the same in every step)
    assert m["steps"][-1]["size_bytes"] == sum((moved / f).stat().st_size
                                               for f in ("manifest.json", "tensors.safetensors"))
    back = torchslim.build_model(f"artifact:{moved}")
    assert get_output(back) == 0
    row = torchslim.measure(back, "digits", batch_sizes=(1,), latency=False)
    assert row["metric"]["value"] == m["steps"][-1]["metric"]["value"]
    # the ONNX file holds the selected output: (batch, 10) logits
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "run" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 8, 8)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), back(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", ["dict_net", "named_net"])
def test_logits_is_chosen_automatically(tmp_path, factory, digits_task):
    model = torchslim.build_model(_spec(tmp_path, factory))
    torch.manual_seed(0)
    train(model, digits_task, TrainConfig(epochs=2, lr=0.01, optimizer="adamw", loggers=()))
    assert digits_task.evaluate(model) > 0.6


def test_name_selector_and_bad_selector(tmp_path, digits_task):
    model = torchslim.build_model(_spec(tmp_path, "scores_net"))
    with pytest.raises(OutputError, match=r"\['scores'\] Tensor\(\d+x10\), \['features'\] Tensor\(\d+x16\)"):
        torchslim.measure(model, digits_task, latency=False)
    assert torchslim.measure(model, digits_task, latency=False, output="scores")["metric"] is not None
    assert get_output(model) is None  # measure's output= does not stay on the model
    with pytest.raises(OutputError, match="output 'logits' is not a tensor"):
        digits_task.evaluate(set_output(model, "logits"))


def test_googlenet_trains_on_its_logits_in_train_mode():
    """torchvision's googlenet returns a GoogLeNetOutputs namedtuple in train mode."""
    model = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False)
    task = torchslim.build_task("shape:3x64x64")
    x, y = task.example_inputs(2)[0], torch.tensor([0, 2])
    model.train()
    loss = task.loss(task.forward(model, (x, y)), (x, y))
    loss.backward()
    assert loss.ndim == 0 and model.fc.weight.grad is not None


def test_cli_measure_output_flag(tmp_path, capsys):
    spec = _spec(tmp_path, "tuple_net")
    assert main(["measure", spec, "--task", "digits", "--batch-sizes", "1"]) == 2
    assert "--output" in capsys.readouterr().err
    out = tmp_path / "row.json"
    assert main(["measure", spec, "--task", "digits", "--batch-sizes", "1", "--output", "0",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metric"]["name"] == "accuracy"


# -- modules of one's own ------------------------------------------------------------------
def _own(hidden: int = 16) -> nn.Module:
    import importlib.util
    spec = importlib.util.spec_from_file_location("own_multi_output", ASSETS / "multi_output.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(1)
    return mod.dict_net(hidden)


def test_measure_a_plain_module(digits_task):
    from safetensors.torch import save

    model = _own()
    row = torchslim.measure(model, digits_task, batch_sizes=(1,))
    assert row["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert row["macs"] == 64 * 16 + 16 * 10
    assert row["size_bytes"] == len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    assert 0 <= row["metric"]["value"] <= 1


def test_save_a_plain_module_with_a_source(tmp_path, monkeypatch):
    model = _own(hidden=8)
    with pytest.raises(ArtifactError, match="source='py:FILE.py:FACTORY'"):
        torchslim.save(model, tmp_path / "a")
    f = tmp_path / "mine.py"
    shutil.copyfile(ASSETS / "multi_output.py", f)
    with pytest.raises(ArtifactError, match="hidden.weight|is .* here but"):
        torchslim.save(model, tmp_path / "a", source=f"py:{f}:dict_net")  # default hidden=16
    torchslim.save(model, tmp_path / "a", source=f"py:{f}:dict_net", args={"hidden": 8})
    f.unlink()  # the artifact holds its own copy
    monkeypatch.delenv("TORCHSLIM_TRUST_CODE", raising=False)
    with pytest.raises(ArtifactError, match="trust_code=True"):
        torchslim.load(tmp_path / "a")
    back = torchslim.load(tmp_path / "a", trust_code=True)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_attach_source_then_save(tmp_path):
    from torchslim.specs import attach_source

    model = torchvision.models.squeezenet1_1(num_classes=4)
    torchslim.save(attach_source(model, "torchvision:squeezenet1_1", {"num_classes": 4}), tmp_path / "s")
    back = torchslim.load(tmp_path / "s")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_hugging_face_outputs():
    """A ModelOutput with logits is chosen automatically; an encoder's two tensors are ambiguous."""
    transformers = pytest.importorskip("transformers")
    from torchslim.outputs import prediction

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)
    ids = torch.randint(0, 50, (2, 5))
    clf = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        assert prediction(clf, clf(ids)).shape == (2, 3)
        out = transformers.BertModel(cfg).eval()(ids)
    with pytest.raises(OutputError, match=r"\['last_hidden_state'\] Tensor\(2x5x16\), "
                                          r"\['pooler_output'\] Tensor\(2x16\)"):
        prediction(clf, out)
    assert prediction(set_output(nn.Identity(), "pooler_output"), out).shape == (2, 16)
