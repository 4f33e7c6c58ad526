"""Model soups and spherical interpolation: ``merge.uniform``, ``merge.greedy-soup``, ``merge.slerp``.

The ingredients are the current model followed by ``models`` (see :mod:`.base`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from torch import nn

from ...config import option
from ...errors import RecipeError
from ...registry import register_method
from . import primitives as P
from .base import MergeConfig, evaluate, merge_state, need_metric_task, run_merge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UniformMergeConfig(MergeConfig):
    """Uniform model soup (Wortsman et al. 2022, "Model soups", sec. 2): every float tensor is the
    mean of the ingredients' (``sum_i w_i theta_i / sum_i w_i`` with ``weights``).

    Examples
    --------
    >>> UniformMergeConfig(models=("zoo:lenet-5",)).n_ingredients()
    2
    """

    weights: tuple[float, ...] | None = option(None, low=0.0, doc="one non-negative weight per ingredient "
                                               "(the current model first); default equal")

    def validate(self) -> None:
        super().validate()
        if self.weights is not None and sum(self.weights) <= 0:
            raise RecipeError("UniformMergeConfig.weights: their sum must be positive")


@register_method("merge.uniform", UniformMergeConfig)
def _uniform(model: nn.Module, config: UniformMergeConfig, ctx) -> nn.Module:
    """Uniform soup: the (weighted) mean of the ingredients' weights (Wortsman et al. 2022)."""
    return run_merge(model, config, ctx, lambda name, ts, base: P.weighted_mean(ts, config.weights),
                     buffer_weights=config.weights)


@dataclass(frozen=True)
class GreedySoupConfig(MergeConfig):
    """Greedy model soup (Wortsman et al. 2022, Algorithm 1): the ingredients sorted by their
    metric on ``split`` (best first); each is added to the soup (the uniform mean of those
    chosen) when the soup's metric on ``split`` with it is at least as good as without it. The
    result is never worse on ``split`` than the best ingredient. Needs a task with data.

    Examples
    --------
    >>> GreedySoupConfig(models=("zoo:lenet-5", "zoo:lenet-5")).split
    'val'
    """

    split: str = option("val", choices=("val", "train"), doc="split the ingredients are ranked and the soup "
                        "grown on (keep test for the report)")

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        need_metric_task(task, "merge.greedy-soup")


@register_method("merge.greedy-soup", GreedySoupConfig)
def _greedy_soup(model: nn.Module, config: GreedySoupConfig, ctx) -> nn.Module:
    """Greedy soup: add ingredients best first while the validation metric does not drop."""
    task = ctx.require_task("merge.greedy-soup")
    need_metric_task(task, "merge.greedy-soup")
    better = (lambda a, b: a >= b) if task.higher_is_better else (lambda a, b: a <= b)
    record: dict = {}

    def choose(models: list[nn.Module], names: list[str]) -> list[int]:
        scores = [evaluate(m, task, config.split) for m in models]
        order = sorted(range(len(models)), key=lambda i: -scores[i] if task.higher_is_better else scores[i])
        soup, best = [order[0]], scores[order[0]]
        trial = copy.deepcopy(models[0])
        steps = [{"model": names[order[0]], "metric": best, "kept": True}]
        for i in order[1:]:
            state = merge_state([models[j] for j in soup + [i]], None,
                                lambda name, ts, base: P.weighted_mean(ts), [names[j] for j in soup + [i]])
            trial.load_state_dict(state)
            value = evaluate(trial, task, config.split)
            kept = better(value, best)
            steps.append({"model": names[i], "metric": value, "kept": kept})
            if kept:
                soup.append(i)
                best = value
        log.info("merge.greedy-soup: %d of %d ingredients kept (%s %s %.4f)", len(soup), len(models),
                 task.metric_name, config.split, best)
        record.update(split=config.split, ranked=[{"model": names[i], "metric": scores[i]} for i in order],
                      steps=steps, kept=[names[i] for i in soup])
        return soup

    out = run_merge(model, config, ctx, lambda name, ts, base: P.weighted_mean(ts), choose=choose)
    ctx.info["metrics"]["greedy"] = record
    return out


@dataclass(frozen=True)
class SlerpConfig(MergeConfig):
    """Spherical linear interpolation of two models, tensor by tensor, as mergekit does
    (:func:`~torchslim.methods.merge.primitives.slerp`; linear for nearly colinear tensors):
    the current model at ``t = 0``, the one in ``models`` at ``t = 1``. Float buffers (BatchNorm
    statistics) are interpolated linearly.

    Examples
    --------
    >>> SlerpConfig(models=("zoo:lenet-5",), t=0.25).t
    0.25
    """

    N_MODELS = 1

    t: float = option(0.5, low=0.0, high=1.0, doc="interpolation factor: 0 the current model, 1 the other")


@register_method("merge.slerp", SlerpConfig)
def _slerp(model: nn.Module, config: SlerpConfig, ctx) -> nn.Module:
    """Slerp between the current model (t=0) and one other (t=1), per tensor."""
    return run_merge(model, config, ctx, lambda name, ts, base: P.slerp(ts[0], ts[1], config.t),
                     buffer_weights=(1.0 - config.t, config.t))
