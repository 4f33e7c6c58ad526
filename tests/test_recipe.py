"""Recipe YAML reading: values as a user writes them."""

from __future__ import annotations

from torchslim.recipe import Recipe, apply_override


def test_unquoted_n_m_granularity_is_read_as_a_string(tmp_path):
    """YAML 1.1 reads 2:4 as the base-60 number 124; recipes and --set read it as written."""
    path = tmp_path / "r.yaml"
    path.write_text("model: zoo:digits-cnn\ntask: digits\nsteps:\n  - prune: {method: magnitude, granularity: 2:4}\n"
                    "  - prune: {method: magnitude, sparsity: 0.5}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.steps[0].config.granularity == "2:4"
    assert recipe.steps[1].config.sparsity == 0.5      # other numbers unchanged
    data = {"steps": [{"prune": {"method": "magnitude"}}]}
    apply_override(data, "steps.0.prune.granularity=1:4")
    assert data["steps"][0]["prune"]["granularity"] == "1:4"
