"""Reading ``sensitivity.json`` (written by :mod:`.sensitivity`): no model, no pruning code, so
the config can check a curves file at preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import RecipeError, UserError

SCHEMA = 1


def load_curves(path: str | Path) -> dict[str, Any]:
    """Read a ``sensitivity.json`` written by :func:`analyze` (strict JSON, schema checked)."""
    import json
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"sensitivity curves {path}: cannot read: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("layers"), dict):
        raise UserError(f"sensitivity curves {path}: not a torchslim sensitivity file (schema {SCHEMA})")
    return data


def check_granularity(data: dict[str, Any], path: str | Path, granularity: str) -> None:
    """RecipeError unless the curves ``data`` read from ``path`` were measured at ``granularity``
    (a file without the field holds ``weight`` curves), so a step does not plan from curves of
    another kind."""
    if data.get("granularity", "weight") != granularity:
        raise RecipeError(f"prune.sensitivity: {path} holds {data.get('granularity', 'weight')!r} curves; this "
                          f"step prunes granularity {granularity!r}: measure them with "
                          f"torchslim sensitivity --granularity {granularity}")


def timed(data: dict[str, Any]) -> bool:
    """Whether curves ``data`` were timed (``analyze(latency=...)``): the model's milliseconds and
    a fourth value, the milliseconds removed, in every point's ``removed`` row."""
    rows = data.get("layers", {}).values()
    return (isinstance(data.get("model"), dict) and "latency_ms" in data["model"]
            and all(isinstance(row, dict) and "removed" in row and all(len(r) > 3 for r in row["removed"])
                    for row in rows))


def check_timed(data: dict[str, Any], path: str | Path) -> None:
    """RecipeError unless curves ``data`` read from ``path`` can plan a ``budget: latency``."""
    if not timed(data):
        raise RecipeError(f"prune.sensitivity: {path} holds curves that were not timed, so they cannot plan "
                          "budget: latency; measure them with torchslim sensitivity --granularity channel (or "
                          "head) --latency-batch-size N")


def check_layers_exist(data: dict[str, Any], path: str | Path, model: Any) -> None:
    """RecipeError when curves of ``data`` (read from ``path``) name layers ``model`` does not
    have (a module or a weight tensor): curves of another model. Curves missing for some of the
    model's layers are found when the step plans (that needs the step's dependency graph)."""
    names = {n for n, _ in model.named_modules()} | {n.removesuffix(".weight") for n, _ in model.named_parameters()}
    unknown = [k for k in data["layers"] if k not in names]
    if unknown:
        raise RecipeError(f"prune.sensitivity: {path} has curves for {len(unknown)} layer(s) this model does not "
                          f"have ({', '.join(unknown[:5])}): curves of another model? Measure them on this one "
                          "with torchslim sensitivity")
