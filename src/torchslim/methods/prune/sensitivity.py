"""Sensitivity analysis: how the task metric falls as each layer alone is pruned.

For every layer the pruning config targets, a copy of the model is pruned at several
sparsities with only that layer targeted (one-shot, BatchNorm statistics re-estimated as the
pipeline does) and evaluated on a held-out split (``val`` by default: the test split stays
untouched for the final figures). One-shot curves measure the damage of a cut before any
training; with ``finetune_steps`` each cut is first trained a few hundred steps (NetAdapt's
short-term fine-tune, Yang et al. 2018, sec. 3.2), so the curves say what a layer can recover
from, which is what a plan fine-tuned afterwards needs (a cut cheap before training may be one
training cannot undo). The curves say which layers tolerate
pruning; :func:`~torchslim.methods.prune.primitives.allocate_ratios` turns them into
non-uniform per-layer sparsities for a global budget (Han et al. 2015, sec. 4; Li et al. 2017,
sec. 4.1 for filters).

The result is a JSON-ready mapping (``sensitivity.json``, schema 1)::

    {"schema": 1, "method": "prune.magnitude", "granularity": "channel", "split": "val",
     "metric": "accuracy", "baseline": 0.97, "finetune_steps": 0,
     "layers": {"features.0": {"params": 896, "weights": 864, "macs": 110592,
                               "points": [[0.1, 0.97], [0.3, 0.96], ...]}, ...}}

For granularity ``channel`` (one curve per channel group, named by its root layer) and ``head``
the mapping also holds ``"model": {"params": P, "macs": M}`` and, per layer, ``"removed": [[0.1,
params removed, MACs removed], ...]``: what each point took from the whole model, measured
(pruning a group's channels also shrinks the layers that read them). Analysed with ``latency``
(a batch size and a runtime), the model's forward time goes in as well: ``"model": {...,
"latency_ms": T}``, ``"latency": {"batch_size": B, "runtime": "eager", "threads": N}`` and a
fourth value per point, the milliseconds it removed: ``T`` times the fraction of the model's time
the pruned copy saved, the two timed in turns (measured, so it can be below 0 by noise).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import RecipeError, UserError
from ...fileio import write_json
from ...measure import _traced_pass, count_macs, count_params, layer_summary
from ...progress import Progress
from ...session import Session
from ...specs.tasks import Task, to_device
from ...modules import weight_names
from .base import PruneConfig, parse_nm
from .curves import SCHEMA, load_curves, timed  # noqa: F401 (public here too)

log = logging.getLogger("torchslim.sensitivity")  # outside the pruning loggers silenced below

DEFAULT_POINTS = (0.1, 0.3, 0.5, 0.7, 0.9)


#: granularities whose pruning shrinks more than the layer named (the layers reading its channels
#: or heads): their curves record what each point removed, measured
MEASURED_COST = ("channel", "head")


def layer_names(model: nn.Module, config: PruneConfig, inputs: tuple) -> list[str]:
    """The units of the analysis: attention modules (head), channel groups by root (channel),
    else the modules holding the weights ``config`` targets."""
    from .base import prunable_weights
    if config.granularity == "head":  # a curve per attention module: its heads removed
        from .heads import attention_sites
        return [s.name for s in attention_sites(model, config.targets, config.ignore)]
    if config.granularity == "channel":  # a curve per channel group, named by its root layer
        from .structured import channel_groups
        return channel_groups(model, config, inputs)
    names = []
    for param in prunable_weights(model, config.targets, config.ignore):
        module = param.rsplit(".", 1)[0] if "." in param else ""
        if module not in names:
            names.append(module)
    return names


def check_ranking(config_cls: type, name: str) -> None:
    """RecipeError when the criterion of ``config_cls`` (method ``name``) is a rule whose sparsity
    is its result (``threshold``): a curve needs a sparsity to vary. Checked on the class, before
    a config (threshold's needs ``alpha``) is built."""
    if getattr(config_cls, "SPARSITY_IS_RESULT", False):
        raise RecipeError(f"sensitivity: the {name} rule decides how much it removes (alpha), so it has no "
                          "sparsity to vary; analyse with a ranking criterion (magnitude, taylor, activation, "
                          "entropy, random)")


def check_config(config: PruneConfig) -> None:
    """RecipeError for a config a sensitivity analysis cannot vary: an N:M pattern, granularity
    ``layer``, or a rule whose sparsity is its result (``threshold``)."""
    check_ranking(type(config), config.name)
    if parse_nm(config.granularity) is not None:
        raise RecipeError("sensitivity: an N:M pattern has one sparsity (1 - N/M); analyse granularity weight")
    if config.granularity == "layer":
        raise RecipeError("sensitivity: granularity layer drops a layer whole, so its curve would be one point; "
                          "analyse granularity head, channel or weight (or compare single-layer drops with "
                          "prune: {granularity: layer, targets: [NAME]} runs)")


def check_latency(config: PruneConfig, runtime: str) -> None:
    """RecipeError unless curves of ``config`` can be timed on ``runtime``: granularity channel or
    head (a dense model with zeroed weights runs as long) and a runtime a search can time
    (:func:`~.cost.check_runtime`)."""
    from .cost import check_runtime
    if config.granularity not in MEASURED_COST:
        raise RecipeError(f"sensitivity: latency is measured for granularity channel and head (a dense model with "
                          f"zeroed weights runs as long), not {config.granularity!r}")
    check_runtime(runtime, "sensitivity latency")


def analyze(model: nn.Module, task: Task, config: PruneConfig, *, method: str = "prune.magnitude",
            points: Sequence[float] = DEFAULT_POINTS, split: str = "val", recalibrate_bn: int = 512,
            layers: Sequence[str] | None = None, finetune_steps: int = 0, finetune_lr: float = 0.01,
            finetune_batch_size: int = 64, latency: tuple[int, str] | None = None) -> dict[str, Any]:
    """Per-layer sensitivity curves of ``model`` on ``task`` (see the module doc).

    Parameters
    ----------
    config : PruneConfig
        The pruning to analyse (criterion by ``method``, ``granularity``, ``targets``/``ignore``
        choose the layers); its ``sparsity``, ``scope``, ``schedule`` and ``finetune`` are
        replaced per point.
    points : sparsities in (0, 1), each a point of every curve.
    split : the split evaluated (``val``, ``test``, ``train``).
    recalibrate_bn : training examples for BatchNorm re-estimation after each pruning (0: off).
    layers : module names to analyse (default: every layer ``config`` targets).
    finetune_steps : SGD steps on the train split after each cut, before it is evaluated
        (:func:`~torchslim.train.trainer.short_finetune`: momentum 0.9, ``finetune_lr`` decayed to 0
        by a cosine,
        batches of ``finetune_batch_size``, the same seeded batches for every cut; the zeros of
        every weight tensor held, so pruned weights do not grow back); 0: one-shot.
    latency : ``(batch size, runtime)``: granularity channel and head also time the model and
        every point's pruned copy (one-shot, before any short fine-tune), for ``budget: latency``
        plans (:func:`~.cost.model_cost`); None: not timed.

    Returns the mapping described in the module doc; metric values are the task's metric
    (higher is better). Cost: ``len(layers) * len(points)`` evaluations of ``split`` (and as many
    short fine-tunes of ``finetune_steps`` steps); with ``latency``, twice as many timings (each
    point's copy and the model in turns, each at least :data:`~.cost.MIN_RUN_TIME` seconds).

    Raises
    ------
    RecipeError
        For points outside (0, 1), a negative ``finetune_steps``, a config that cannot prune a
        layer alone, or ``latency`` with granularity weight.
    UserError
        For a task without data or metric.
    """
    from ...registry import get_method

    bad = [p for p in points if not 0.0 < float(p) < 1.0]
    if bad or not points:
        raise RecipeError(f"sensitivity: points must be sparsities in (0, 1), got {list(points)}")
    if finetune_steps < 0 or not finetune_lr > 0 or finetune_batch_size < 1:
        raise RecipeError(f"sensitivity: finetune_steps must be >= 0, finetune_lr > 0 and finetune_batch_size >= 1, "
                          f"got {finetune_steps}, {finetune_lr} and {finetune_batch_size}")
    check_config(config)
    if latency is not None:
        check_latency(config, latency[1])
    verb, _, name = method.partition(".")
    entry = get_method(verb, name)
    if not isinstance(config, entry.config_cls):
        raise RecipeError(f"sensitivity: {method} takes a {entry.config_cls.__name__}, got {type(config).__name__}")
    baseline = task.evaluate(model, split)
    if baseline is None:
        raise UserError(f"sensitivity: task {task.spec!r} has no metric on its {split!r} split")
    inputs = to_device(task.example_inputs(1), next(model.parameters()).device)
    names = list(layers) if layers else layer_names(model, config, inputs)
    counter, _ = _traced_pass(model, inputs)
    summary = {r["name"]: r for r in layer_summary(model, counter)}
    session = Session(task=task)
    out: dict[str, Any] = {"schema": SCHEMA, "method": method, "granularity": config.granularity,
                           "criterion": getattr(config, "name", name), "split": split,
                           "metric": task.metric_name, "baseline": baseline, "points": [float(p) for p in points],
                           "finetune_steps": int(finetune_steps), "layers": {}}
    if finetune_steps:
        out["finetune"] = {"lr": float(finetune_lr), "batch_size": int(finetune_batch_size), "momentum": 0.9,
                           "schedule": "cosine"}
    if config.granularity in MEASURED_COST:
        out["model"] = {"params": count_params(model)[0], "macs": count_macs(model, inputs)}
    timer = None
    if latency is not None:
        from .cost import RelativeCost, latency_setting
        batch, runtime = int(latency[0]), str(latency[1])
        timer = RelativeCost(task, "latency", model, latency_batch_size=batch, latency_runtime=runtime)
        out["latency"] = latency_setting(batch, runtime)
        out["model"]["latency_ms"] = timer.size(model)
    quiet = logging.getLogger("torchslim.methods.prune")  # not one summary line per evaluation
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        _run(model, task, config, method, names, points, split, recalibrate_bn, summary, session, out,
             (finetune_steps, finetune_lr, finetune_batch_size), timer)
    finally:
        quiet.setLevel(level)
    return out


def _run(model, task, config, method, names, points, split, recalibrate_bn, summary, session, out,
         finetune, timer=None) -> None:
    from ...api import apply_
    from ...train.trainer import short_finetune
    steps, lr, batch_size = finetune
    inputs = to_device(task.example_inputs(1), next(model.parameters()).device)
    with Progress(len(names) * len(points), "sensitivity", unit="eval") as bar:
        for layer in names:
            curve, removed = [], []
            for p in points:
                cfg = dataclasses.replace(config, targets=(layer,), ignore=(), sparsity=float(p), scope="layer",
                                          schedule="oneshot", finetune=None)
                pruned = apply_(copy.deepcopy(model), cfg, task=task, method=method)
                if recalibrate_bn:
                    session.recalibrate_batchnorm(pruned, recalibrate_bn)
                took = None if timer is None else out["model"]["latency_ms"] * (1.0 - timer(pruned))
                if steps:
                    short_finetune(pruned, task, steps, lr=lr, batch_size=batch_size)
                metric = task.evaluate(pruned, split)
                curve.append([float(p), float(metric) if metric is not None and math.isfinite(metric) else None])
                if "model" in out:  # what pruning this layer's units took from the whole model
                    removed.append([float(p), out["model"]["params"] - count_params(pruned)[0],
                                    out["model"]["macs"] - count_macs(pruned, inputs)]
                                   + ([round(took, 6)] if took is not None else []))
                bar.update(layer=layer, sparsity=p)
            row = summary.get(layer, {})
            module = model.get_submodule(layer)
            weights = sum(getattr(module, w).numel() for w in weight_names(module))
            out["layers"][layer] = {"params": row.get("params"), "weights": weights, "macs": row.get("macs"),
                                    "points": curve}
            if removed:
                out["layers"][layer]["removed"] = removed  # [[sparsity, params, MACs(, ms)], ...]
            log.info("sensitivity %s: %s", layer, ", ".join(f"{p:.0%} {m:.4f}" if m is not None else f"{p:.0%} nan"
                                                          for p, m in curve))


def ratios_from_curves(data: dict[str, Any], budget: float, cost: str = "params",
                       max_sparsity: float = 0.95, allocation: str = "equal_drop") -> dict[str, float]:
    """Per-layer sparsities from curves for a global ``budget``: the fraction of ``cost``
    (``params`` or ``macs``) removed, of the layers' summed cost, or for curves that record what
    each point removed (granularity channel and head, ``removed``), of the whole model's
    (``latency``: of its measured forward time, for curves analysed with ``latency``; a point's
    removal is held at or above the previous point's, so timing noise never makes a deeper cut
    look free); see
    :func:`primitives.allocate_ratios` (``allocation``: ``equal_drop`` or ``knapsack``). The
    predicted removal adds the layers' own; coupled cuts
    overlap, so :func:`~.dispatch.sensitivity_ratios` measures the plan and corrects it."""
    from .primitives import allocate_ratios
    if cost not in ("params", "macs", "latency"):
        raise RecipeError(f"sensitivity budget: cost must be params, macs or latency, got {cost!r}")
    curves, costs = {}, {}
    measured = "model" in data and all("removed" in row for row in data["layers"].values())
    column = {"params": 1, "macs": 2, "latency": 3}[cost]
    if cost == "latency" and not (measured and timed(data)):
        raise RecipeError("sensitivity budget: latency needs curves timed as they were measured (granularity channel "
                          "or head, torchslim sensitivity --latency-batch-size N); these curves hold no latency")
    for name, row in data["layers"].items():
        pts = [(0.0, data["baseline"])] + [(p, m if m is not None else -math.inf) for p, m in row["points"]]
        curves[name] = pts
        if measured:  # what each point took from the whole model (coupled layers included)
            costs[name], top = [], 0.0
            for r in sorted(row["removed"], key=lambda r: r[0]):  # never less than a smaller cut's (timing noise)
                top = max(top, float(r[column]))
                costs[name].append((r[0], top))
        else:  # params: the weights pruning removes (biases stay), where the file records them
            costs[name] = float((row.get("weights") if cost == "params" else None) or row.get(cost) or 0)
    total = float(data["model"]["latency_ms" if cost == "latency" else cost]) if measured else None
    try:
        return allocate_ratios(curves, costs, data["baseline"], budget, max_sparsity=max_sparsity, total=total,
                               allocation=allocation)
    except ValueError as exc:
        raise RecipeError(f"sensitivity ratios: {exc}") from None


def write(data: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``sensitivity.json`` and ``sensitivity.png`` (one curve per layer) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sensitivity.json"
    write_json(path, data)
    from ...fileio import atomic_open
    from ...report import sensitivity_figure
    fig = sensitivity_figure(data)
    if fig is not None:
        fig.tight_layout()
        with atomic_open(out / "sensitivity.png", "wb") as f:
            fig.savefig(f, format="png")
    return path


__all__ = ["analyze", "load_curves", "ratios_from_curves", "write", "DEFAULT_POINTS"]
