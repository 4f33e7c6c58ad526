"""NetAdapt: per-group channel ratios found by measuring, round after round, which single
group's cut costs the least accuracy after a short fine-tune (Yang et al., "NetAdapt:
Platform-Aware Neural Network Adaptation for Mobile Applications", ECCV 2018, Algorithm 1).

Each round sets a smaller resource target (the model's MACs, params or measured latency, falling
geometrically from the dense model's to ``(1 - budget)`` of it over ``rounds`` rounds). Every channel group proposes
one candidate: the model of the previous round with just enough of that group's lowest-ranked
channels removed to meet the target (groups that cannot meet it without losing every channel
propose none). Each candidate gets its BatchNorm statistics re-estimated and ``steps`` SGD steps
(:func:`~torchslim.train.trainer.short_finetune`, NetAdapt's short-term fine-tune), then is
evaluated on the ``val`` split; the best one is the next round's model. Unlike curves of each
group cut alone from the dense model (:mod:`.sensitivity`), every round measures the cuts on the
model as already adapted, so cuts that only hurt together are seen.

The result is the kept fraction of every group's channels: ``ratios: netadapt`` prunes the step's
model to those ratios with the step's criterion, then its ``finetune`` trains it (NetAdapt's
long-term fine-tune). Cost: about ``rounds * groups`` short fine-tunes and evaluations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

from torch import nn

from ...errors import RecipeError, UserError
from ...progress import Progress
from ...session import Session
from ...specs.tasks import Task, to_device
from .base import PruneConfig

log = logging.getLogger("torchslim.netadapt")


def _units(model: nn.Module, root: str) -> int:
    """Output channels of the group root ``root`` (a conv, a linear, or a class given a pruner)."""
    from .roots import _PRUNERS
    m = model.get_submodule(root)
    for cls in type(m).__mro__:
        if cls in _PRUNERS:
            return int(_PRUNERS[cls].get_out_channels(m))
    return int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)


def netadapt_ratios(model: nn.Module, task: Task, config: PruneConfig, *, method: str, budget: float,
                    cost: str = "macs", rounds: int = 10, steps: int = 100, lr: float = 0.01,
                    batch_size: int = 64, split: str = "val", recalibrate_bn: int = 512,
                    latency_batch_size: int = 1, latency_runtime: str = "eager",
                    record: dict[str, Any] | None = None
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-group channel sparsities for granularity ``channel`` that remove ``budget`` (a fraction
    in (0, 1)) of ``model``'s ``cost`` (``macs``, ``params`` or ``latency``: milliseconds per
    forward pass of ``latency_batch_size`` examples on ``latency_runtime``, measured, see
    :func:`~.cost.model_cost`), found by NetAdapt (module doc). With latency, a group's proposal
    is found by bisection over its allowed channel counts, each candidate timed in turns with the
    dense model (about log2(channels) pairs of timings per group and round), so the fractions
    follow the machine as it runs; the count found is confirmed by the median of 3 pairs (or the
    next smaller counts are), and the final model is timed again so into ``record``: ``{"measured": fraction of the dense
    model's time removed, "dense_ms", "planned_ms", "unstable": timings that stayed noisy}``.

    ``config`` chooses the groups (``targets``/``ignore``) and ranks channels (criterion of
    ``method``); its sparsity, scope and fine-tune are replaced. ``model`` is not changed.

    Returns ``({group root: sparsity}, history)``: the fraction of each group's output channels
    removed (0 for groups never chosen), and one entry per round ``{"round", "group", "removed",
    "kept", "metric", "size"}`` (``size``: the chosen model's cost as a fraction of the dense
    model's; ``metric`` on ``split`` after the short fine-tune, None if not finite; the best as the task says:
    ``higher_is_better``). A group keeps at least ``1 - config.max_layer_sparsity`` of its
    original channels, and with ``config.round_to`` a multiple of it (groups narrower than it: any count),
    so the step's final prune keeps exactly what the rounds kept.

    Raises
    ------
    RecipeError
        For a budget outside (0, 1), rounds < 1, steps < 0, lr <= 0, a config that is not
        granularity channel, no channel group to adapt, or a round no group can meet (the budget
        is out of reach one group per round: more rounds or a smaller budget).
    UserError
        For a task without data or metric.
    """
    from ...api import apply_
    from ...train.trainer import short_finetune
    from .sensitivity import layer_names

    from .cost import COSTS, RelativeCost
    if not 0.0 < budget < 1.0 or rounds < 1 or steps < 0 or not lr > 0 or cost not in COSTS:
        raise RecipeError(f"netadapt: needs 0 < budget < 1, rounds >= 1, steps >= 0, lr > 0 and cost macs, params "
                          f"or latency; got {budget}, {rounds}, {steps}, {lr} and {cost!r}")
    if config.granularity != "channel":
        raise RecipeError(f"netadapt: adapts channel groups (granularity channel), not {config.granularity!r}")
    device = next(model.parameters()).device
    inputs = to_device(task.example_inputs(1), device)

    # the cost as a fraction of the dense model's (latency: the two timed in turns at every call)
    size = RelativeCost(task, cost, model, device=device, latency_batch_size=latency_batch_size,
                        latency_runtime=latency_runtime)

    work = copy.deepcopy(model).eval()
    groups = layer_names(work, config, inputs)
    if not groups:
        raise RecipeError("netadapt: no channel group to adapt (targets/ignore leave none, or only output layers)")
    if task.evaluate(work, split) is None:
        raise UserError(f"netadapt: task {task.spec!r} has no metric on its {split!r} split")
    original = {g: _units(work, g) for g in groups}
    # the fewest channels a group may keep: max_layer_sparsity of its original count, at least 1
    floor = {g: max(1, math.ceil((1.0 - config.max_layer_sparsity) * n - 1e-9)) for g, n in original.items()}
    session = Session(task=task)
    sign = 1.0 if task.higher_is_better else -1.0

    def cut(m: nn.Module, group: str, n: int, remove: int) -> nn.Module:
        cfg = dataclasses.replace(config, targets=(group,), ignore=(), sparsity=remove / n, scope="layer",
                                  schedule="oneshot", finetune=None, layer_sparsity={}, round_to=1)
        return apply_(copy.deepcopy(m), cfg, task=task, method=method)

    def proposal(group: str, now: float, target: float) -> tuple[nn.Module, int, float] | None:
        """``work`` (of cost ``now``) with the fewest channels of ``group`` removed that meets
        ``target``, keeping a count the final prune keeps too (``floor``, ``round_to``); with
        how many went and its cost."""
        n = _units(work, group)
        allowed = list(range(n - 1, floor[group] - 1, -1))
        if 1 < config.round_to <= original[group]:  # the final prune rounds to a multiple (round_kept)
            allowed = [k for k in allowed if k % config.round_to == 0]
        if not allowed:
            return None
        if cost == "latency":  # timed: one channel's time is below the noise, so bisect on the counts
            return _bisect(allowed, lambda kept: cut(work, group, n, n - kept), size, target, n, confirm=size.median)
        per_channel = now - size(cut(work, group, n, 1))  # what one channel costs, to start near the answer
        if per_channel <= 0:
            return None
        guess = n - math.ceil((now - target) / per_channel - 1e-9)
        for kept in [k for k in allowed if k <= guess + 1] or allowed[-1:]:
            cand = cut(work, group, n, n - kept)
            left = size(cand)
            if left <= target:
                return cand, n - kept, left
        return None

    history: list[dict[str, Any]] = []
    quiet = logging.getLogger("torchslim.methods.prune")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        # one update per candidate: a round of a big model (groups x short fine-tunes) is long
        with Progress(rounds * len(groups), "netadapt", unit="candidate") as bar:
            for r in range(1, rounds + 1):
                target = (1.0 - budget) ** (r / rounds)
                now = size(work) if cost != "latency" else 1.0  # (latency proposals bisect instead)
                best = None
                for g in groups:
                    found = proposal(g, now, target)
                    bar.update(round=r, group=g)
                    if found is None:
                        continue
                    cand, removed, left = found
                    if recalibrate_bn:
                        session.recalibrate_batchnorm(cand, recalibrate_bn)
                    if steps:
                        short_finetune(cand, task, steps, lr=lr, batch_size=batch_size)
                    metric = task.evaluate(cand, split)
                    metric = None if metric is None or not math.isfinite(metric) else float(metric)
                    key = (-math.inf if metric is None else sign * metric, -left)
                    if best is None or key > best[0]:
                        best = (key, g, removed, cand, metric)
                if best is None:
                    raise RecipeError(
                        f"netadapt: round {r} of {rounds}: no channel group can bring the model to "
                        f"{target:.1%} of its {cost} alone (each keeps at least 1 - max_layer_sparsity of "
                        f"its channels{', in multiples of round_to' if config.round_to > 1 else ''}); the budget "
                        f"{budget:.1%} is out of reach one group per round: give more adapt_rounds or a smaller "
                        "sparsity")
                (_, left), g, removed, work, metric = best
                history.append({"round": r, "group": g, "removed": removed, "kept": _units(work, g),
                                "metric": metric, "size": round(-left, 6)})
                log.info("netadapt round %d/%d: %s -%d channels (%d kept), %s %s, %s %.1f%%", r, rounds, g,
                         removed, _units(work, g), split, "nan" if metric is None else f"{metric:.4f}", cost,
                         100 * -left)
    finally:
        quiet.setLevel(level)
    ratios = {g: 1.0 - _units(work, g) / original[g] for g in groups}  # unrounded: floor((1 - r) n) = kept
    if record is not None and cost == "latency":   # one pair accepted each proposal: time the result again
        left = size.median(work)
        record.update(measured=round(1.0 - left, 6), dense_ms=round(size.last[0], 6),
                      planned_ms=round(size.last[1], 6), unstable=size.unstable)
    return ratios, history


def _bisect(allowed: list[int], make, size, target: float, n: int, confirm=None,
            tries: int = 3) -> tuple[nn.Module, int, float] | None:
    """The largest kept count of ``allowed`` (descending) whose model ``make(kept)`` costs at most
    ``target`` (``size``), by bisection (the cost taken to fall as channels go); None if even the
    smallest count does not meet it.

    ``confirm`` (a steadier, dearer figure: the median of several timings): the count found is
    accepted only if ``confirm`` also puts it within ``target``; otherwise the next ``tries - 1``
    smaller counts are confirmed in turn (a bisection on noisy timings ends on a count that looked
    fast by chance), and None if none is. The figure returned is ``confirm``'s."""
    last = make(allowed[-1])
    left = size(last)
    if left > target:
        return None
    best = (last, n - allowed[-1], left)
    lo, hi = 0, len(allowed) - 1  # allowed[hi] meets the target; counts before lo are not known to
    while lo < hi:
        mid = (lo + hi) // 2
        cand = make(allowed[mid])
        got = size(cand)
        if got <= target:
            best, hi = (cand, n - allowed[mid], got), mid
        else:
            lo = mid + 1
    if confirm is None:
        return best
    for i in range(hi, min(hi + tries, len(allowed))):
        cand = best[0] if i == hi else make(allowed[i])
        got = confirm(cand)
        if got <= target:
            return cand, n - allowed[i], got
    return None


__all__ = ["netadapt_ratios"]
