"""Every example recipe in examples/ and shipped recipe in recipes/ validates (``--dry-run``), so
the docs never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchslim.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_recipe_validates(recipe, data_root, capsys):
    assert main(["compress", str(recipe), "--dry-run", "--data-dir", str(data_root)]) == 0
    assert "# plan" in capsys.readouterr().out


def test_there_are_examples():
    assert len(EXAMPLES) >= 2
