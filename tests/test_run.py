"""The in-memory run with observers, the capabilities configs declare, recipe versions and
``search:`` validation."""

from __future__ import annotations

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.pipeline import OutputDir, RunObserver, execute
from torchslim.recipe import RECIPE_VERSION, Recipe


def _recipe(**extra):
    return Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits",
                             "train": {"optimizer": "adamw", "epochs": 2, "lr": 0.003, "loggers": []},
                             "measure": {"batch_sizes": [1], "latency": False}, **extra})


class _Seen(RunObserver):
    def __init__(self):
        self.rows, self.done = [], None

    def step_done(self, index, row, metrics):
        self.rows.append((index, row["name"]))

    def run_done(self, metrics, model):
        self.done = model


def test_candidates_reuse_one_measured_baseline(digits_task):
    """A search trains and measures the baseline once; each candidate runs only its steps, in
    memory, with nothing written."""
    torch.manual_seed(0)
    base_recipe = _recipe()
    seen = _Seen()
    metrics, trained = execute(base_recipe, digits_task, torchslim.build_model("zoo:digits-cnn"), observers=[seen])
    assert seen.rows == [(0, "baseline")] and seen.done is trained
    baseline = (trained, metrics["steps"][0])
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    results = {}
    for sparsity in (0.5, 0.9):
        cand = _recipe(steps=[{"prune": {"method": "magnitude", "sparsity": sparsity, "scope": "layer"}}])
        seen = _Seen()
        m, model = execute(cand, digits_task, torchslim.build_model("zoo:digits-cnn"), baseline=baseline,
                           observers=[seen])
        assert seen.rows == [(1, "prune-magnitude")]         # no baseline training or measurement
        assert m["steps"][0] == metrics["steps"][0]
        results[sparsity] = m["steps"][1]
        assert float((model[0].weight == 0).float().mean()) == pytest.approx(sparsity, abs=0.01)
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # shared baseline untouched
    assert results[0.9]["nonzero_params"] < results[0.5]["nonzero_params"]
    assert results[0.9]["size_bytes"] < results[0.5]["size_bytes"]


def test_output_dir_is_one_observer(tmp_path, digits_task):
    r = _recipe(steps=[{"quantize": {"method": "linear"}}])
    out, partial = tmp_path / "run", tmp_path / ".run.partial"
    (partial / "steps").mkdir(parents=True)
    torch.manual_seed(0)
    metrics, _ = execute(r, digits_task, torchslim.build_model("zoo:digits-cnn"),
                         observers=[OutputDir(r, out, partial, resume=False)], out_dir=partial)
    assert (out / "model" / "manifest.json").is_file() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00-baseline", "01-quantize-linear"]
    assert not partial.exists()


def test_configs_declare_capabilities():
    from torchslim.distill import LogitsDistillConfig
    from torchslim.methods.export import ExportConfig
    from torchslim.prune import MagnitudePruneConfig
    from torchslim.train import TrainConfig

    assert LogitsDistillConfig(student="zoo:digits-cnn").REPLACES_MODEL
    assert ExportConfig().RANK0_ONLY and not MagnitudePruneConfig().RANK0_ONLY
    assert not MagnitudePruneConfig().trains()
    assert MagnitudePruneConfig(finetune=TrainConfig(epochs=1)).trains()
    assert not MagnitudePruneConfig(finetune=TrainConfig(epochs=0)).trains()
    assert MagnitudePruneConfig(targets=("re:.*fc",)).target_patterns() == {"targets": ("re:.*fc",)}


def test_resolved_recipe_carries_versions_and_newer_ones_are_refused():
    r = _recipe(steps=[{"prune": {"method": "magnitude"}}])
    d = r.to_dict()
    assert d["version"] == RECIPE_VERSION and d["steps"][0]["prune"]["version"] == 1
    assert Recipe.from_dict(d) == r
    with pytest.raises(RecipeError, match="newer than this torchslim"):
        Recipe.from_dict({**d, "version": RECIPE_VERSION + 1})
    d["steps"][0]["prune"]["version"] = 2
    with pytest.raises(RecipeError, match="version 2 of prune.magnitude"):
        Recipe.from_dict(d)


GOOD_SEARCH = {"train.lr": {"log_uniform": [1e-4, 0.1]}, "steps.0.prune.sparsity": {"uniform": [0.5, 0.95]},
               "train.epochs": {"int": [1, 5]}, "steps.0.prune.scope": {"choice": ["global", "layer"]}}


def test_search_block_is_validated():
    r = _recipe(steps=[{"prune": {"method": "magnitude"}}], search=GOOD_SEARCH)
    assert r.search == GOOD_SEARCH
    bad = {
        "train.lrr": ({"uniform": [0.1, 0.2]}, "did you mean 'lr'"),
        "steps.3.prune.sparsity": ({"uniform": [0.1, 0.2]}, "steps.3 is not a field"),
        "train": ({"uniform": [0.1, 0.2]}, "a whole section"),
        "train.lr": ({"loguniform": [0.1, 0.2]}, "did you mean 'log_uniform'"),
    }
    for key, (space, needle) in bad.items():
        with pytest.raises(RecipeError, match=needle):
            _recipe(steps=[{"prune": {"method": "magnitude"}}], search={key: space})
    for space, needle in [({"uniform": [0.9, 0.1]}, "must be below"), ({"log_uniform": [0, 1]}, "must be > 0"),
                          ({"int": [1.5, 3]}, "integers"), ({"choice": []}, "non-empty"),
                          ({"uniform": [0.1]}, r"\[low, high\]"), ("0.5", "one search space")]:
        with pytest.raises(RecipeError, match=needle):
            _recipe(steps=[{"prune": {"method": "magnitude"}}], search={"train.lr": space})


def _import_graph() -> dict[str, set[str]]:
    """torchslim module -> the torchslim modules it imports, at module level or inside functions."""
    import ast
    from pathlib import Path

    root = Path(torchslim.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{mod}.{a.name}" for a in node.names} & set(mods)
                deps |= subs or ({mod} & set(mods))
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles_in_the_package():
    """Regression: artifact <-> model specs, measurement <-> export and layer rebuild -> method
    discovery imported each other (some inside functions). No torchslim module may reach itself
    through imports, lazy ones included."""
    graph = _import_graph()
    assert "torchslim.artifact" in graph and graph["torchslim.specs.models"]
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))


def test_search_values_must_be_accepted_by_their_fields():
    """Regression (newcomer trial): bounds and choices the field refuses passed validation."""
    for key, space, needle in [
            ("steps.0.prune.sparsity", {"uniform": [0.5, 1.5]}, "1.5"),
            ("steps.0.prune.scope", {"choice": ["global", "bogus"]}, "'bogus'"),
            ("train.optimizer", {"choice": ["sgd", "adam"]}, "'adam'"),
            ("measure.runtime", {"choice": ["eager", "eagr"]}, "'eagr'"),
            ("train.epochs", {"uniform": [1, 3]}, "integer field"),
            ("version", {"int": [1, 3]}, "newer than this torchslim"),
            ("steps.0.prune.method", {"choice": ["magnitude", "foo"]}, "'foo'")]:
        with pytest.raises(RecipeError, match=needle):
            _recipe(steps=[{"prune": {"method": "magnitude"}}], search={key: space})


def test_nested_config_errors_name_the_field():
    """Regression (newcomer trial): any mistake inside finetune.distill read 'expected mapping of
    TrainConfig or null'."""
    from torchslim.prune import MagnitudePruneConfig

    for bad, needle in [({"temperature": 0}, "finetune.distill.temperature"),
                        ({"temprature": 2}, "did you mean 'temperature'"),
                        ({"teacher": "basline"}, "did you mean 'baseline'")]:
        with pytest.raises(RecipeError, match=needle):
            MagnitudePruneConfig.from_dict({"finetune": {"epochs": 1, "distill": {"teacher": "baseline", **bad}}})


def test_unrecorded_architecture_change_is_refused_at_save(tmp_path):
    from torch import nn

    from torchslim.errors import ArtifactError

    m = torchslim.build_model("zoo:lenet-300-100")
    m[1] = nn.Linear(784, 200)   # by hand, not through torchslim.edits
    with pytest.raises(ArtifactError, match="changed without being recorded.*replace_module"):
        torchslim.save(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cuda_device_on_a_cpu_machine_is_refused_before_any_work(tmp_path):
    from torchslim.errors import UserError
    from torchslim.pipeline import preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _recipe(device="cuda")
    with pytest.raises(UserError, match="no CUDA device"):
        preflight(r)
    with pytest.raises(UserError, match="no CUDA device"):
        torchslim.compress(r, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
