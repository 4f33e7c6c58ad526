"""Model merging: each method against a direct tensor formula on small real models, the
architecture check, the greedy soup on digits, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import torchslim
from torchslim.cli import main
from torchslim.errors import RecipeError, UserError
from torchslim.methods.merge import primitives as P
from torchslim.methods.merge.task_vectors import dare_generator
from torchslim.registry import get_method
from torchslim.session import Session


def _lenet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:lenet-300-100")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three lenet-300-100 of different seeds, saved as artifacts: (models, specs)."""
    root = tmp_path_factory.mktemp("ingredients")
    models = [_lenet(s) for s in (1, 2, 3)]
    specs = []
    for i, m in enumerate(models):
        torchslim.save(m, root / f"m{i}")
        specs.append(f"artifact:{root / f'm{i}'}")
    return models, specs


def _merge(method: str, model, **fields):
    entry = get_method("merge", method)
    ctx = Session(task=fields.pop("_task", None))
    cfg = entry.config_cls.from_dict(fields, where=f"merge.{method}")
    out = entry.handler(copy.deepcopy(model), cfg, ctx)
    return out, ctx


def _sd(m):
    return {k: v.detach() for k, v in m.state_dict().items()}


# -- each method against its formula, on real models -----------------------------------------
def test_uniform_and_weighted_soup_are_the_mean(saved):
    models, specs = saved
    out, ctx = _merge("uniform", models[0], models=specs[1:])
    for k, v in _sd(out).items():
        expect = (models[0].state_dict()[k] + models[1].state_dict()[k] + models[2].state_dict()[k]) / 3
        torch.testing.assert_close(v, expect, rtol=1e-6, atol=1e-7)
    out, _ = _merge("uniform", models[0], models=specs[1:2], weights=[3.0, 1.0])
    for k, v in _sd(out).items():
        torch.testing.assert_close(v, 0.75 * models[0].state_dict()[k] + 0.25 * models[1].state_dict()[k])
    assert [i["model"] for i in ctx.info["metrics"]["ingredients"]] == ["the current model", *specs[1:]]


def test_uniform_soup_of_identical_models_is_the_model(saved):
    models, specs = saved
    out, _ = _merge("uniform", models[0], models=[specs[0], "current"])
    x = torch.randn(4, 1, 28, 28)
    for k, v in _sd(out).items():
        torch.testing.assert_close(v, models[0].state_dict()[k], rtol=1e-6, atol=0)
    torch.testing.assert_close(out(x), models[0](x), rtol=1e-5, atol=1e-6)


def test_task_arithmetic_is_base_plus_scaled_sum(saved):
    models, specs = saved
    base = models[0].state_dict()
    out, _ = _merge("task-arithmetic", models[0], models=specs[1:], scale=0.3)
    for k, v in _sd(out).items():
        a, b = models[1].state_dict()[k], models[2].state_dict()[k]
        torch.testing.assert_close(v, base[k] + 0.3 * ((a - base[k]) + (b - base[k])))
    # with base given, the current model is the first ingredient; a negative weight subtracts
    out, _ = _merge("task-arithmetic", models[1], models=specs[2:], base=specs[0], weights=[1.0, -0.5])
    for k, v in _sd(out).items():
        a, b = models[1].state_dict()[k], models[2].state_dict()[k]
        torch.testing.assert_close(v, base[k] + (a - base[k]) - 0.5 * (b - base[k]))


def test_ties_against_a_direct_formula(saved):
    models, specs = saved
    out, _ = _merge("ties", models[0], models=specs[1:], density=0.3, scale=0.8)
    for k, v in _sd(out).items():
        base = models[0].state_dict()[k]
        taus = torch.stack([models[i].state_dict()[k] - base for i in (1, 2)])
        # trim: keep the round(0.3 n) largest |tau| of each tensor
        kept = []
        for t in taus:
            n = round(0.3 * t.numel())
            thresh = t.abs().flatten().sort(descending=True).values[n - 1] if n else math.inf
            kept.append(torch.where(t.abs() >= thresh, t, torch.zeros_like(t)))
        kept = torch.stack(kept)
        sign = kept.sum(0).sign()
        agree = (kept.sign() == sign) & (kept != 0)
        mean = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(v, base + 0.8 * mean)


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -2.0, 1.0, 0.5])
    b = torch.tensor([-1.0, -1.0, -4.0, 0.5])
    c = torch.tensor([-1.0, 4.0, 2.0, -2.0])
    # sums [1, 1, -1, -1] elect + + - -; agreeing entries: [3], [4], [-4], [-2]
    assert P.ties(base, [a, b, c], density=1.0).tolist() == [3.0, 4.0, -4.0, -2.0]
    # density 0.5 keeps 2 of 4 per vector: a [3, -2, 0, 0], b [0, 0, -4, 0], c [0, 4, 0, -2]
    # sums [3, 2, -4, -2]: + + - -; means [3, 4, -4, -2]
    assert P.ties(base, [a, b, c], density=0.5, scale=0.5).tolist() == [1.5, 2.0, -2.0, -1.0]
    assert P.ties(base, [a, -a], density=1.0).tolist() == [0.0, 0.0, 0.0, 0.0]  # no sign wins


def test_dare_rescales_kept_entries_and_is_seeded(saved):
    models, specs = saved
    out, _ = _merge("dare", models[0], models=specs[1:2], density=0.3, seed=5)
    again, _ = _merge("dare", models[0], models=specs[1:2], density=0.3, seed=5)
    other, _ = _merge("dare", models[0], models=specs[1:2], density=0.3, seed=6)
    sd = _sd(out)
    assert all(torch.equal(v, _sd(again)[k]) for k, v in sd.items())
    assert not torch.equal(sd["1.weight"], _sd(other)["1.weight"])
    for k, v in sd.items():
        base, tau = models[0].state_dict()[k], models[1].state_dict()[k] - models[0].state_dict()[k]
        g = dare_generator(5, k)
        keep = torch.rand(tau.shape, generator=g) < 0.3
        torch.testing.assert_close(v, base + torch.where(keep, tau / 0.3, torch.zeros_like(tau)))


def test_dare_is_unbiased_in_expectation():
    g = torch.Generator().manual_seed(0)
    base, theta = torch.randn(200, generator=g), torch.randn(200, generator=g)
    runs = torch.stack([P.dare(base, [theta], 0.4, torch.Generator().manual_seed(s)) for s in range(400)])
    expect = P.task_arithmetic(base, [theta])
    # each entry's mean over 400 seeds is within 4 standard errors of theta
    stderr = (theta - base).abs() * math.sqrt((1 - 0.4) / 0.4) / math.sqrt(400)
    assert ((runs.mean(0) - expect).abs() <= 4 * stderr + 1e-6).float().mean() > 0.99


def test_slerp_endpoints_and_midpoint(saved):
    models, specs = saved
    for t, i in ((0.0, 0), (1.0, 1)):
        out, _ = _merge("slerp", models[0], models=specs[1:2], t=t)
        for k, v in _sd(out).items():
            assert torch.equal(v, models[i].state_dict()[k]), (t, k)
    out, _ = _merge("slerp", models[0], models=specs[1:2], t=0.3)
    for k, v in _sd(out).items():
        a, b = models[0].state_dict()[k].double(), models[1].state_dict()[k].double()
        theta = torch.arccos((a / a.norm() * b / b.norm()).sum())
        expect = (torch.sin(0.7 * theta) * a + torch.sin(0.3 * theta) * b) / torch.sin(theta)
        torch.testing.assert_close(v, expect.float())


def test_slerp_falls_back_to_lerp_for_colinear_tensors():
    a = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(P.slerp(a, 3 * a, 0.25), 1.5 * a)
    torch.testing.assert_close(P.slerp(torch.zeros(3), a, 0.5), 0.5 * a)


def test_recipe_step_merges_with_the_baseline_role():
    """In a recipe, ``baseline`` names the recipe's baseline model: averaging a pruned model with it
    gives (pruned + original) / 2 for every weight."""
    from torchslim.pipeline import execute
    from torchslim.recipe import Recipe

    r = Recipe.from_dict({"model": "zoo:lenet-300-100", "task": "shape:1x28x28",
                          "measure": {"batch_sizes": [1], "latency": False},
                          "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "layer"}},
                                    {"merge": {"method": "uniform", "models": ["baseline"]}}]})
    model = _lenet(0)
    metrics, out = execute(r, torchslim.build_task(r.task), copy.deepcopy(model))
    w0 = model.state_dict()["1.weight"]
    pruned = torch.where(w0.abs() >= w0.abs().flatten().kthvalue(w0.numel() // 2 + 1).values, w0, 0 * w0)
    torch.testing.assert_close(out.state_dict()["1.weight"], (pruned + w0) / 2)
    row = metrics["steps"][-1]
    assert row["name"] == "merge-uniform"
    assert [i["model"] for i in row["ingredients"]] == ["the current model", "the baseline model"]


# -- what is merged, and what is refused -----------------------------------------------------
def test_batchnorm_statistics_averaged_and_counters_from_the_first():
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).train()
        m(torch.randn(8, 1, 8, 8))  # running statistics and num_batches_tracked move
        models.append(m.eval())
    models[1].get_submodule("1").num_batches_tracked.fill_(7)
    entry = get_method("merge", "task-arithmetic")
    from torchslim.methods.merge.base import merge_state
    state = merge_state(models, models[0], lambda n, ts, b: P.task_arithmetic(b, ts[1:], 2.0), ["a", "b"])
    s0, s1 = models[0].state_dict(), models[1].state_dict()
    torch.testing.assert_close(state["1.running_var"], (s0["1.running_var"] + s1["1.running_var"]) / 2)
    assert int(state["1.num_batches_tracked"]) == int(s0["1.num_batches_tracked"]) == 1
    torch.testing.assert_close(state["0.weight"], s0["0.weight"] + 2.0 * (s1["0.weight"] - s0["0.weight"]))
    assert entry.config_cls.CHANGES_WEIGHTS  # the pipeline re-estimates BatchNorm statistics after


def test_architecture_mismatch_names_the_tensor(saved, tmp_path):
    models, specs = saved
    torchslim.save(torchslim.build_model("zoo:lenet-300-100", args={"num_classes": 5}), tmp_path / "five")
    with pytest.raises(RecipeError, match=r"tensor '5\.weight' has shape \[10, 100\] in the current model "
                                          r"and \[5, 100\] in artifact:"):
        _merge("uniform", models[0], models=[specs[1], f"artifact:{tmp_path / 'five'}"])
    torchslim.save(torchslim.build_model("zoo:lenet-5"), tmp_path / "lenet5")
    with pytest.raises(RecipeError, match=r"tensor '0.weight' of artifact:\S+ is missing in the current model "
                                          r"\(the base\)"):
        _merge("ties", models[0], models=[f"artifact:{tmp_path / 'lenet5'}"])


@pytest.mark.parametrize("method, fields, match", [
    ("slerp", {"models": ["zoo:lenet-5", "zoo:lenet-5"]}, "takes exactly 1"),
    ("uniform", {"models": []}, "models: missing"),
    ("ties", {"models": ["zoo:lenet-5"], "density": 1.5}, "density: 1.5 is out of range"),
    ("slerp", {"models": ["zoo:lenet-5"], "t": -0.1}, "t: -0.1 is out of range"),
    ("uniform", {"models": ["zoo:lenet-5"], "weights": [1.0]}, "1 given for 2 ingredients"),
    ("dare", {"models": ["lenet-5"]}, "neither a role"),
])
def test_bad_configs_refused(method, fields, match):
    with pytest.raises(RecipeError, match=match):
        get_method("merge", method).config_cls.from_dict(fields)


# -- greedy soup on digits ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_ingredients(digits_task):
    """Three small digits-cnn fine-tuned for one epoch from one base trained for two, with
    different seeds (data orders)."""
    from torchslim.train import TrainConfig, train

    torch.manual_seed(0)
    base = torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32})
    train(base, digits_task, TrainConfig(optimizer="adamw", epochs=2, lr=0.01, loggers=()))
    out = []
    for seed in (1, 2, 3):
        m = copy.deepcopy(base)
        train(m, digits_task, TrainConfig(optimizer="sgd", epochs=1, lr=0.05, seed=seed, loggers=()))
        out.append(m)
    return out


def test_greedy_soup_not_worse_than_best_ingredient_on_val(digits_ingredients, digits_task, tmp_path):
    specs = []
    for i, m in enumerate(digits_ingredients[1:]):
        torchslim.save(m, tmp_path / f"m{i}")
        specs.append(f"artifact:{tmp_path / f'm{i}'}")
    out, ctx = _merge("greedy-soup", digits_ingredients[0], models=specs, _task=digits_task)
    vals = [digits_task.evaluate(m, split="val") for m in digits_ingredients]
    greedy = ctx.info["metrics"]["greedy"]
    assert [r["metric"] for r in greedy["ranked"]] == sorted(vals, reverse=True)
    assert digits_task.evaluate(out, split="val") >= max(vals)
    assert greedy["kept"][0] == greedy["ranked"][0]["model"]
    with pytest.raises(UserError, match="has no metric"):
        get_method("merge", "greedy-soup").config_cls(models=("current",)).check_ready(
            torchslim.build_task("shape:1x8x8"))


# -- the command line ---------------------------------------------------------------------------
def test_cli_merge_end_to_end(saved, tmp_path, capsys):
    models, specs = saved
    dirs = [s.partition(":")[2] for s in specs]
    out = tmp_path / "out"
    code = main(["merge", *dirs, "--method", "ties", "--base", specs[0], "--task", "shape:1x28x28",
                 "--set", "density=0.5", "--no-latency", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    merged = torchslim.load(out / "model")
    expect = {k: P.ties(models[0].state_dict()[k], [m.state_dict()[k] for m in models], 0.5)
              for k in models[0].state_dict()}
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expect[k])
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["name"]: r for r in metrics["steps"]}
    assert [i["model"] for i in rows["merge-ties"]["ingredients"]] == ["the current model", *specs[1:]]
    assert rows["merge-ties"]["base"]["model"] == specs[0]
    assert rows["merge-ties"]["config"]["density"] == 0.5
    report = (out / "report.md").read_text()
    assert "## Merged models" in report and f"| merge-ties | base | {specs[0]} |" in report


@pytest.mark.parametrize("argv, match", [
    (["A"], "at least two models"),
    (["A", "B", "C", "--method", "slerp"], "slerp: merges exactly 2 models; 3 given"),
    (["A", "B", "--method", "greedy-soup", "--task", "shape:1x28x28"], "has no metric"),
    (["A", "B", "--method", "ties", "--base", "C", "--set", "density=2"], "density: 2.0 is out of range"),
    (["A", "B", "--method", "ties"], "needs --base MODEL"),
    (["A", "B", "--method", "soup"], "did you mean"),
    (["A", "B", "--set", "models=[]"], "give it as --method, MODEL arguments or --base"),
])
def test_cli_merge_bad_input(saved, argv, match, capsys, tmp_path):
    _, specs = saved
    argv = [{"A": specs[0], "B": specs[1], "C": specs[2]}.get(a, a) for a in argv]
    if "--method" not in argv:
        argv += ["--method", "uniform"]
    if "--task" not in argv:
        argv += ["--task", "shape:1x28x28"]
    assert main(["merge", *argv, "--no-latency", "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err


def test_cli_merge_takes_the_task_of_the_run_the_models_came_from(saved, tmp_path, capsys):
    models, _ = saved
    run = tmp_path / "run"
    for i, m in enumerate(models[:2]):
        torchslim.save(m, run / f"m{i}")
    (run / "metrics.json").write_text(json.dumps({"task": "shape:1x28x28", "steps": []}))
    out = tmp_path / "out"
    assert main(["merge", str(run / "m0"), str(run / "m1"), "--method", "uniform", "--no-latency",
                 "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["task"] == "shape:1x28x28"
    # models from nowhere still need --task, and say so
    loose = tmp_path / "loose"
    torchslim.save(models[0], loose)
    assert main(["merge", str(loose), str(run / "m1"), "--method", "uniform", "--out", str(tmp_path / "o2")]) == 2
    assert "--task TASK is needed" in capsys.readouterr().err


def test_cli_merge_does_not_run_a_py_task_named_by_the_run(saved, tmp_path, capsys, monkeypatch):
    from torchslim.artifact import TRUST_ENV

    monkeypatch.delenv(TRUST_ENV, raising=False)   # another test's --trust-code may have set it
    models, _ = saved
    run = tmp_path / "run"
    for i, m in enumerate(models[:2]):
        torchslim.save(m, run / f"m{i}")
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (run / "metrics.json").write_text(json.dumps({"task": f"py:{tmp_path / 'evil.py'}:make", "steps": []}))
    assert main(["merge", str(run / "m0"), str(run / "m1"), "--method", "uniform", "--out", str(tmp_path / "o")]) == 2
    assert "--trust-code" in capsys.readouterr().err and not marker.exists()


def test_cli_merge_names_a_missing_model_directory(saved, tmp_path, capsys):
    _, specs = saved
    assert main(["merge", specs[0].partition(":")[2], str(tmp_path / "nodir"), "--method", "uniform",
                 "--task", "shape:1x28x28", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nodir' does not exist; give an artifact directory" in err and "role" not in err
