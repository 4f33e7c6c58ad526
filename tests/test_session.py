"""The session handlers work in: calibration batches (the same on every torchrun rank), capture
of activations and gradients, the layer-by-layer runner, rank helpers, the device."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError, UserError
from torchslim.recipe import Recipe
from torchslim.session import Session, resolve_device


def test_calibration_batches_are_seeded_and_sized(digits_task):
    s = Session(task=digits_task)
    a = s.calibration_batches(100, batch_size=32, seed=3)
    b = s.calibration_batches(100, batch_size=32, seed=3)
    c = s.calibration_batches(100, batch_size=32, seed=4)
    assert [len(x[1]) for x in a] == [32, 32, 32, 4]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    val = s.calibration_batches(10, split="val", batch_size=10)[0][0]
    ds = digits_task.split("val")
    assert any(torch.equal(val[0], ds[i][0]) for i in range(len(ds)))
    with pytest.raises(RecipeError):
        s.calibration_batches(0)
    with pytest.raises(UserError, match="needs a task"):
        Session().calibration_batches(4)


def test_capture_records_inputs_outputs_and_gradients():
    torch.manual_seed(0)
    m = torchslim.build_model("zoo:lenet-300-100")
    x = torch.randn(5, 1, 28, 28)
    with Session().capture(m, ["1", "3"], outputs=True, grads=True) as got:
        out = m(x)
        out.sum().backward()
    h1 = m[2](m[1](m[0](x)))
    torch.testing.assert_close(got["3"]["inputs"][0], h1.detach())
    torch.testing.assert_close(got["1"]["outputs"][0], m[1](m[0](x)).detach())
    # d(sum)/d(output of the last layer's input layer): grad of 3's output is W5^T 1 masked by ReLU
    g3 = got["3"]["grads"][0]
    assert g3.shape == (5, 100) and torch.isfinite(g3).all() and g3.abs().sum() > 0
    m(x)  # hooks are gone: nothing more is recorded
    assert len(got["1"]["inputs"]) == 1


def test_sequential_runner_feeds_each_layer_the_changed_model(digits_task):
    """After layer "1" is zeroed by the callback, layer "3" must see the inputs of the changed
    model (all zeros after ReLU of a zero layer with zero bias), not the original ones."""
    torch.manual_seed(0)
    m = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    s = Session(task=digits_task)
    batches = s.calibration_batches(64, batch_size=32)
    seen = {}

    def fn(name, module, inputs):
        seen[name] = torch.cat(inputs)
        if name == names[0]:
            with torch.no_grad():
                module.weight.zero_()
                module.bias.zero_()

    s.sequential(m, names, batches, fn)
    assert seen[names[0]].shape[0] == 64 and seen[names[0]].abs().sum() > 0
    assert seen[names[1]].abs().sum() == 0


def test_resolve_device_and_recipe_field():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda")
    r = Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits", "device": "cpu"})
    assert r.device == "cpu" and r.to_dict()["device"] == "cpu"
    with pytest.raises(RecipeError, match="device"):
        Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits", "device": "tpu"})


RANKS_SCRIPT = r"""
import sys, torch, torchslim
from torchslim import distributed as tsdist
from torchslim.session import Session
tsdist.init_from_env()
rank = tsdist.rank()
torch.manual_seed(1000 + rank)          # the global RNG differs per rank: the draw must not use it
s = Session(task=torchslim.build_task("digits"))
batches = s.calibration_batches(48, batch_size=16, seed=7)
total = s.all_reduce_sum(torch.tensor([float(rank + 1)]))
token = s.broadcast(f"from-rank-{rank}")
torch.save({"x": torch.cat([b[0] for b in batches]), "y": torch.cat([b[1] for b in batches]),
            "total": total, "token": token, "world": s.world_size}, f"{sys.argv[1]}/cal{rank}.pt")
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_calibration_batches_identical_on_two_torchrun_ranks(tmp_path):
    (tmp_path / "ranks.py").write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "ranks.py", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"cal{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["x"].shape == (48, 1, 8, 8)
    assert torch.equal(r0["x"], r1["x"]) and torch.equal(r0["y"], r1["y"])
    assert float(r0["total"]) == float(r1["total"]) == 3.0
    assert r0["token"] == r1["token"] == "from-rank-0"


def test_sequential_runs_in_eval_mode_and_names_are_checked(digits_task):
    """Regression (newcomer trial): dropout was active and BatchNorm statistics moved."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(144, 10)).train()
    s = Session(task=digits_task)
    batches = s.calibration_batches(32, batch_size=16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    runs = []
    for _ in range(2):
        got = {}
        s.sequential(m, ["5"], batches, lambda name, mod, inputs: got.update({name: torch.cat(inputs)}))
        runs.append(got["5"])
    assert torch.equal(runs[0], runs[1]) and m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(RecipeError, match="no module named 'conv9'"):
        s.sequential(m, ["conv9"], batches, lambda *a: None)
    with pytest.raises(RecipeError, match="did you mean 'test'"):
        s.calibration_batches(4, split="tset")
