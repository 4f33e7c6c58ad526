"""Running a pruning step: ``ratios: sensitivity`` resolved, then the granularity's own module.

Kept apart from ``base.py`` (the config), which the granularity modules import: the config never
imports them back.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...errors import RecipeError
from .base import PruneConfig, parse_nm, prunable_weights
from .criteria import CriterionEntry, get_criterion


def run_prune(model: nn.Module, config: PruneConfig, session, criterion: str | CriterionEntry) -> nn.Module:
    """Prune ``model`` in place as ``config`` says, ranking with the registered ``criterion`` (a
    name, or an entry with options bound by :func:`~.criteria.bind`).

    Raises
    ------
    RecipeError
        For a criterion that needs data on a task without any (see :meth:`PruneConfig.check_data`).
    UserError
        For a criterion that needs data without a task.
    """
    entry = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if config.ratios == "sensitivity":
        config = sensitivity_ratios(model, config, session)
    if entry.needs:
        config.check_data(session.task)
        session.require_task(f"prune.{entry.name} (its criterion needs {' and '.join(entry.needs)})")
    if parse_nm(config.granularity) is not None or config.granularity == "weight":
        from .unstructured import prune_weights
        return prune_weights(model, config, session, entry)
    if config.granularity == "channel":
        from .structured import prune_channels
        return prune_channels(model, config, session, entry)
    if config.granularity == "head":
        from .heads import prune_heads
        return prune_heads(model, config, session, entry)
    if config.granularity == "layer":
        from .heads import drop_layers
        return drop_layers(model, config, session, entry)
    raise RecipeError(f"prune.granularity {config.granularity!r}: not available yet")


def sensitivity_ratios(model: nn.Module, config: PruneConfig, session) -> PruneConfig:
    """``config`` with ``ratios: sensitivity`` resolved into ``layer_sparsity``: every targeted
    layer's own sparsity, from the curves of ``config.sensitivity`` or of a sensitivity analysis
    run now on the ``val`` split, for a budget of ``config.sparsity`` of the layers' ``budget``
    (params or MACs). The curves go into the step's row (``sensitivity``), where the report
    plots them.
    """
    from . import sensitivity as sens
    task = session.require_task("prune.ratios: sensitivity")
    method = f"prune.{config.name}"
    uniform = dataclasses.replace(config, ratios="uniform", sensitivity=None, layer_sparsity={})
    if config.sensitivity is not None:
        data = sens.load_curves(config.sensitivity)
        if data.get("granularity", "weight") != config.granularity:
            raise RecipeError(f"prune.sensitivity: {config.sensitivity} holds {data.get('granularity')!r} curves; "
                              f"this step prunes granularity {config.granularity!r}: measure them with "
                              f"torchslim sensitivity --granularity {config.granularity}")
        if data.get("method") not in (None, method):
            session.warn("sensitivity_mismatch", f"{config.sensitivity} was measured with {data['method']}, "
                                                 f"this step ranks with {method}")
        now = task.evaluate(model, data.get("split", "val"))
        if now is not None and abs(now - data["baseline"]) > 0.01:
            session.warn("sensitivity_mismatch",
                         f"{config.sensitivity} was measured on a model scoring {data['baseline']:.4f} on "
                         f"{data.get('split', 'val')}, this one scores {now:.4f}: the curves may be of another "
                         "model (or of it before training)")
        names = set(prunable_weights(model, config.targets, config.ignore))
        layers = {n.rpartition(".")[0] for n in names}
        missing = sorted(layers - set(data["layers"]))
        if missing:
            raise RecipeError(f"prune.sensitivity: {config.sensitivity} has no curve for "
                              f"{', '.join(missing[:8])}; rerun torchslim sensitivity with these targets")
        data = {**data, "layers": {k: v for k, v in data["layers"].items() if k in layers}}
    else:
        data = sens.analyze(model, task, uniform, method=method, split="val")
    cap = min(config.max_layer_sparsity, 0.95)
    ratios = sens.ratios_from_curves(data, config.sparsity, config.budget, max_sparsity=cap)
    session.info.setdefault("metrics", {})["sensitivity"] = data
    session.info["metrics"]["sensitivity_ratios"] = ratios
    # the layers the budget leaves dense get sparsity 0 (and the gradual ramp starts from 0)
    return dataclasses.replace(uniform, scope="layer", layer_sparsity={k: v for k, v in ratios.items() if v > 0},
                               sparsity=0.0, initial_sparsity=0.0)
