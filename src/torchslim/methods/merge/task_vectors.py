"""Task-vector merges: ``merge.task-arithmetic``, ``merge.ties``, ``merge.dare``.

A task vector is ``tau_i = theta_i - base``, the change fine-tuning made to a base model. Without
``base``, the current model is the base and ``models`` are the fine-tuned ingredients; with
``base``, the current model is the first ingredient (see :mod:`.base`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ...config import ModelRef, option
from ...registry import register_method
from . import primitives as P
from .base import MergeConfig, run_merge


@dataclass(frozen=True)
class TaskArithmeticConfig(MergeConfig):
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", eq. 1):
    ``base + scale * sum_i w_i * (theta_i - base)``. A negative weight negates a task.

    Examples
    --------
    >>> c = TaskArithmeticConfig(models=("zoo:lenet-5", "zoo:lenet-5"), scale=0.5)
    >>> c.n_ingredients(), c.refs()[1]
    (2, 'current')
    """

    USES_BASE = True

    base: str | ModelRef | None = option(None, doc="the model the task vectors are taken from (a spec, "
                                         "{spec, weights}, or baseline); default: the current model")
    weights: tuple[float, ...] | None = option(None, doc="one weight per task vector (negative: subtract "
                                               "the task); default 1")
    scale: float = option(1.0, low=0.0, doc="lambda, the scaling of the summed task vectors")


@register_method("merge.task-arithmetic", TaskArithmeticConfig)
def _task_arithmetic(model: nn.Module, config: TaskArithmeticConfig, ctx) -> nn.Module:
    """base + lambda * sum of the task vectors (Ilharco et al. 2023)."""
    return run_merge(model, config, ctx, lambda name, ts, base: P.task_arithmetic(
        base, ts, config.scale, config.weights), buffer_weights=_buffer_weights(config))


def _buffer_weights(config) -> tuple[float, ...] | None:
    """Buffers are averaged over the ingredients; negative task weights count by magnitude."""
    if config.weights is None:
        return None
    w = tuple(abs(x) for x in config.weights)
    return w if sum(w) > 0 else None


@dataclass(frozen=True)
class TiesMergeConfig(TaskArithmeticConfig):
    """TIES-merging (Yadav et al. 2023, Algorithm 1): trim each task vector to its ``density``
    fraction of largest-magnitude entries (per tensor), elect each entry's sign by the sign of the
    sum of the trimmed vectors, average the entries that agree with it (disjoint mean) and add
    ``scale`` times the result to the base.

    Examples
    --------
    >>> TiesMergeConfig(models=("zoo:lenet-5",)).density
    0.2
    """

    density: float = option(0.2, low=0.0, high=1.0, doc="fraction of each task vector kept (top |tau|; "
                            "the paper keeps 20%)")


@register_method("merge.ties", TiesMergeConfig)
def _ties(model: nn.Module, config: TiesMergeConfig, ctx) -> nn.Module:
    """TIES: trim, elect sign, disjoint mean, then base + lambda * merged (Yadav et al. 2023)."""
    return run_merge(model, config, ctx, lambda name, ts, base: P.ties(
        base, ts, config.density, config.scale, config.weights), buffer_weights=_buffer_weights(config))


@dataclass(frozen=True)
class DareMergeConfig(TaskArithmeticConfig):
    """DARE (Yu et al. 2024, "Language models are Super Mario", eq. 2), then task arithmetic: each
    task-vector entry is dropped with probability ``p = 1 - density`` and the rest rescaled by
    ``1 / (1 - p)``; the masks are seeded by ``seed`` and the tensor's name, so a run repeats.

    Examples
    --------
    >>> DareMergeConfig(models=("zoo:lenet-5",), density=0.1).density
    0.1
    """

    density: float = option(0.5, low=0.0, high=1.0, doc="probability of keeping a task-vector entry (1 - p)")
    seed: int = option(0, low=0, doc="seed of the drop masks (with each tensor's name)")


def dare_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of one tensor's DARE masks: 32 bits from ``seed`` and the tensor name,
    so the same seed drops the same entries whatever else the model holds."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}|{name}".encode()))


@register_method("merge.dare", DareMergeConfig)
def _dare(model: nn.Module, config: DareMergeConfig, ctx) -> nn.Module:
    """DARE: drop and rescale each task vector (seeded), then task arithmetic (Yu et al. 2024)."""
    return run_merge(model, config, ctx, lambda name, ts, base: P.dare(
        base, ts, config.density, dare_generator(config.seed, name), config.scale, config.weights),
        buffer_weights=_buffer_weights(config))
