"""The shipped Han et al. 2015 recipes (recipes/deep-compression-*.yaml): they validate and ask for
the paper's compression (fast); run whole, they reach the paper's error at <= 8% kept (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

import torchslim
from torchslim.recipe import Recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: recipe -> largest test error (fraction) of the pruned model: Han et al. 2015, Table 1
#: (LeNet-300-100 1.59%, LeNet-5 0.77%), rounded up to the goal
GOALS = {"deep-compression-lenet-300-100.yaml": 0.016, "deep-compression-lenet-5.yaml": 0.008}
KEPT = 0.08   # largest fraction of the parameters (biases included) left non-zero


def _planned_kept(recipe: Recipe) -> float:
    """Non-zero parameters the recipe's per-layer sparsities leave, over all parameters."""
    model = recipe.model.build()
    prune = recipe.steps[0].config
    fixed = prune.sparsity_of([n for n, p in model.named_parameters() if p.dim() >= 2], model)
    kept = 0
    for name, p in model.named_parameters():
        kept += p.numel() - round(fixed[name] * p.numel()) if name in fixed else p.numel()
    return kept / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(GOALS))
def test_shipped_recipe_validates_and_plans_the_paper_compression(name):
    recipe = Recipe.from_yaml(RECIPES / name)   # the whole recipe validated, no data read
    assert [s.key for s in recipe.steps] == ["prune.magnitude"]
    model = recipe.model.build()
    prune = recipe.steps[0].config
    prune.check_targets(model)
    # every weight tensor has its own (Han's per-layer) rate, and together they keep <= 8%
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert sorted(prune.sparsity_of(weights, model)) == sorted(weights)
    assert _planned_kept(recipe) <= KEPT


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GOALS))
def test_shipped_recipe_reaches_the_paper(name, data_root, tmp_path):
    """Minutes each on 2 cores (BENCHMARKS.md, "Han et al. 2015 on MNIST")."""
    metrics = torchslim.compress(RECIPES / name, tmp_path / "run", data_dir=str(data_root))
    final = metrics["steps"][-1]
    assert final["metric"]["name"] == "accuracy"
    # accuracy over the 10,000 test images is a multiple of 1e-4: rounded, the error compares exactly
    assert round(1.0 - final["metric"]["value"], 4) <= GOALS[name], final["metric"]
    assert final["nonzero_params"] / final["params"] <= KEPT
    assert final["size_bytes"] < metrics["steps"][0]["size_bytes"] / 7  # bitmask + kept values on disk
