"""Running a pruning step: ``ratios: sensitivity`` resolved, then the granularity's own module.

Kept apart from ``base.py`` (the config), which the granularity modules import: the config never
imports them back.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from ...errors import RecipeError
from ...specs.tasks import to_device
from .base import PruneConfig, parse_nm
from .criteria import CriterionEntry, get_criterion
from .curves import check_granularity

log = logging.getLogger("torchslim.sensitivity")


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
        config = sensitivity_ratios(model, config, session, entry)
    elif config.ratios == "netadapt":
        config = netadapt_plan(model, config, session)
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


def sensitivity_ratios(model: nn.Module, config: PruneConfig, session, entry: CriterionEntry | None = None
                       ) -> PruneConfig:
    """``config`` with ``ratios: sensitivity`` resolved into ``layer_sparsity``: every targeted
    layer's own sparsity, from the curves of ``config.sensitivity`` or of a sensitivity analysis
    run now on the ``val`` split, for a budget of ``config.sparsity`` of the layers' ``budget``
    (params or MACs). The curves go into the step's row (``sensitivity``), where the report
    plots them.

    Granularity ``channel`` and ``head``: the budget is a fraction of the whole model's params,
    MACs or latency (timed, :mod:`.cost`). The curves predict what each group's (attention
    module's) cut removes alone; cuts of coupled groups overlap, so the plan is pruned on a copy,
    measured, and the planned budget corrected by bisection until the measured removal is within
    half a point of the asked one (two points timed; ``sensitivity_budget`` in the row).
    """
    from . import sensitivity as sens
    task = session.require_task("prune.ratios: sensitivity")
    method = f"prune.{config.name}"
    uniform = dataclasses.replace(config, ratios="uniform", sensitivity=None, sensitivity_steps=0, layer_sparsity={},
                                  allocation="equal_drop", **_NO_BUDGET)
    if config.sensitivity is not None:
        data = sens.load_curves(config.sensitivity)
        check_granularity(data, config.sensitivity, config.granularity)
        if data.get("method") not in (None, method):
            session.warn("sensitivity_mismatch", f"{config.sensitivity} was measured with {data['method']}, "
                                                 f"this step ranks with {method}")
        now = task.evaluate(model, data.get("split", "val"))
        if now is not None and abs(now - data["baseline"]) > 0.01:
            session.warn("sensitivity_mismatch",
                         f"{config.sensitivity} was measured on a model scoring {data['baseline']:.4f} on "
                         f"{data.get('split', 'val')}, this one scores {now:.4f}: the curves may be of another "
                         "model (or of it before training)")
        inputs = to_device(task.example_inputs(1), session.device)
        layers = set(sens.layer_names(model, uniform, inputs))
        missing = sorted(layers - set(data["layers"]))
        if missing:
            raise RecipeError(f"prune.sensitivity: {config.sensitivity} has no curve for "
                              f"{', '.join(missing[:8])}; rerun torchslim sensitivity with these targets")
        data = {**data, "layers": {k: v for k, v in data["layers"].items() if k in layers}}
        timed = data.get("latency") or {}
        now = _latency_setting(config)
        if config.budget == "latency" and timed and [timed.get(k) for k in ("batch_size", "runtime", "threads")] != [
                now[k] for k in ("batch_size", "runtime", "threads")]:
            session.warn("sensitivity_mismatch", f"{config.sensitivity} was timed at batch {timed.get('batch_size')} "
                                                 f"on {timed.get('runtime')} with {timed.get('threads')} threads, "
                                                 f"this step's budget at batch {now['batch_size']} on {now['runtime']} "
                                                 f"with {now['threads']}: the fractions may differ")
    else:
        latency = (config.latency_batch_size, config.latency_runtime) if config.budget == "latency" else None
        data = sens.analyze(model, task, uniform, method=method, split="val", finetune_steps=config.sensitivity_steps,
                            finetune_lr=config.sensitivity_lr, latency=latency)
    cap = min(config.max_layer_sparsity, 0.95)
    ratios = sens.ratios_from_curves(data, config.sparsity, config.budget, max_sparsity=cap,
                                     allocation=config.allocation)
    metrics = session.info.setdefault("metrics", {})
    metrics["sensitivity"] = data
    if config.granularity in sens.MEASURED_COST and entry is not None:
        ratios, metrics["sensitivity_budget"] = _measured_plan(model, uniform, session, entry, data, ratios, cap,
                                                               config.budget, config.allocation, config)
        found = metrics["sensitivity_budget"]
        timed = found.get("latency")
        log.info("ratios: sensitivity: the plan removes %.1f%% of the model's %s (asked %.1f%%)%s", 100 * found["measured"],
                 config.budget, 100 * found["target"],
                 f": {timed['dense_ms']:.3f} -> {timed['planned_ms']:.3f} ms at batch {timed['batch_size']} on "
                 f"{timed['runtime']}" if timed else "")
    metrics["sensitivity_ratios"] = ratios
    # the layers the budget leaves dense get sparsity 0 (and the gradual ramp starts from 0)
    return _planned(uniform, ratios)


def netadapt_plan(model: nn.Module, config: PruneConfig, session) -> PruneConfig:
    """``config`` with ``ratios: netadapt`` resolved into ``layer_sparsity``: each channel group's
    sparsity found by :func:`~.adapt.netadapt_ratios` on a copy of ``model`` for a budget of
    ``config.sparsity`` of the model's ``budget`` (params, MACs or latency), in ``adapt_rounds``
    rounds of candidates trained ``sensitivity_steps`` steps at ``sensitivity_lr``. The rounds and
    the ratios go into the step's row (``netadapt: {cost, target, rounds, ratios}``; latency:
    ``latency`` too, the setting and the final plan timed again, with a warning when it is more
    than two points from the budget)."""
    from .adapt import netadapt_ratios
    task = session.require_task("prune.ratios: netadapt")
    uniform = dataclasses.replace(config, ratios="uniform", sensitivity_steps=0, adapt_rounds=10, **_NO_BUDGET)
    ratios, history = netadapt_ratios(model, task, uniform, method=f"prune.{config.name}", budget=config.sparsity,
                                      cost=config.budget, rounds=config.adapt_rounds,
                                      steps=config.sensitivity_steps, lr=config.sensitivity_lr,
                                      latency_batch_size=config.latency_batch_size,
                                      latency_runtime=config.latency_runtime, record=(timing := {}))
    row = {"cost": config.budget, "target": config.sparsity, "rounds": history,
           "ratios": {k: round(v, 6) for k, v in ratios.items()}}
    if config.budget == "latency":
        row["latency"] = {**_latency_setting(config), **timing}
        if abs(timing["measured"] - config.sparsity) > 0.02:
            session.warn("netadapt_budget", f"ratios: netadapt: the plan, timed again, removes {timing['measured']:.1%} "
                                            f"of the model's latency, asked {config.sparsity:.1%} (timing noise: "
                                            f"{timing['dense_ms']:.3f} ms dense, {timing['planned_ms']:.3f} ms planned)")
    session.info.setdefault("metrics", {})["netadapt"] = row
    return _planned(uniform, ratios)


#: the plan's budget fields back at their defaults (the planned config prunes to fixed ratios)
_NO_BUDGET = {"budget": "params", "latency_batch_size": 1, "latency_runtime": "eager"}


def _latency_setting(config: PruneConfig) -> dict:
    from .cost import latency_setting
    return latency_setting(config.latency_batch_size, config.latency_runtime)


def _planned(uniform: PruneConfig, ratios: dict[str, float]) -> PruneConfig:
    return dataclasses.replace(uniform, scope="layer", layer_sparsity={k: v for k, v in ratios.items() if v > 0},
                               sparsity=0.0, initial_sparsity=0.0)


def _measured_plan(model: nn.Module, uniform: PruneConfig, session, entry: CriterionEntry, data: dict,
                   ratios: dict[str, float], cap: float, cost: str, allocation: str = "equal_drop",
                   config: PruneConfig | None = None, tolerance: float | None = None,
                   trials: int = 12) -> tuple[dict[str, float], dict]:
    """Channel and head plans measured on a copy: the planned budget ``b`` whose pruned copy removes the
    asked fraction of the model's params, MACs or latency (bisection on ``b``; the removal grows with
    it). Within ``tolerance`` of the asked fraction: half a point counted, two points timed (a
    latency moves by about that from one measurement to the next; each trial is the median of 3
    pairs of timings, and the chosen plan is timed again so, the figure recorded)."""
    import copy
    import logging

    from ...session import Session
    from . import sensitivity as sens
    if uniform.granularity == "head":
        from .heads import prune_heads as prune
    else:
        from .structured import prune_channels as prune

    from .cost import RelativeCost
    target = uniform.sparsity
    if tolerance is None:
        tolerance = 0.02 if cost == "latency" else 0.005
    # latency: the model timed in turns with each trial (the curves' figure is from another moment)
    fraction = RelativeCost(session.task, cost, model, device=session.device,
                            latency_batch_size=config.latency_batch_size if config is not None else 1,
                            latency_runtime=config.latency_runtime if config is not None else "eager")
    def measure(r: dict[str, float]) -> tuple[float, nn.Module]:
        trial = copy.deepcopy(model)
        cfg = dataclasses.replace(_planned(uniform, r), schedule="oneshot", finetune=None)
        prune(trial, cfg, Session(task=session.task, device=session.device), entry)
        return 1.0 - fraction.median(trial), trial  # latency: the median of 3 pairs (a pair moves ~3%)

    quiet = logging.getLogger("torchslim.methods.prune")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lo, hi = 0.0, None
        planned, (measured, trial) = target, measure(ratios)
        best = (abs(measured - target), planned, ratios, measured, trial)
        for _ in range(trials):
            if best[0] <= tolerance:
                break
            if measured < target:
                lo = planned
            else:
                hi = planned
            # the curves' summed removal counts a cut shared by coupled groups once per group: a plan may
            # need a planned budget past 1 (ratios_from_curves refuses one beyond every curve's end)
            planned = (lo + hi) / 2 if hi is not None else planned + (target - measured) * 1.5 + 1e-3
            try:
                r = sens.ratios_from_curves(data, planned, cost, max_sparsity=cap, allocation=allocation)
            except RecipeError:  # beyond what the curves can remove: the largest plan is the answer
                hi = planned
                continue
            measured, trial = measure(r)
            if abs(measured - target) < best[0]:
                best = (abs(measured - target), planned, r, measured, trial)
    finally:
        quiet.setLevel(level)
    _, planned, r, measured, trial = best
    if cost == "latency":  # chosen as the closest of single timings: its figure is taken again
        measured = 1.0 - fraction.median(trial)
    if abs(measured - target) > tolerance:
        session.warn("sensitivity_budget", f"ratios: sensitivity: the closest plan removes {measured:.1%} of the "
                                           f"model's {cost}, asked {target:.1%}")
    out = {"cost": cost, "target": target, "planned": round(planned, 6), "measured": round(measured, 6)}
    if cost == "latency" and config is not None:   # the chosen plan's two timings, taken in turns
        dense_ms, planned_ms = fraction.last
        out["latency"] = {**_latency_setting(config), "dense_ms": round(dense_ms, 6),
                          "planned_ms": round(planned_ms, 6), "unstable": fraction.unstable}
    return r, out
