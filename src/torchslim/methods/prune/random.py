"""``prune.random``: remove weights, channels, heads or layers chosen at random (the control)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .base import PruneConfig
from .dispatch import run_prune
from .criteria import bind


@dataclass(frozen=True)
class RandomPruneConfig(PruneConfig):
    """Remove a seeded uniform random choice of units: the baseline a criterion must beat.

    Each layer's scores come from a generator seeded with ``seed`` and the layer's name, so the
    same seed removes the same weights, whatever else the recipe targets.

    Examples
    --------
    >>> import torch, torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> a = torchslim.apply(m, RandomPruneConfig(sparsity=0.5, scope="layer", seed=1))
    >>> b = torchslim.apply(m, RandomPruneConfig(sparsity=0.5, scope="layer", seed=1))
    >>> torch.equal(a[1].weight, b[1].weight), float((a[1].weight == 0).float().mean())
    (True, 0.5)
    """

    seed: int = option(0, low=0, doc="seed of the random scores (same seed, same choice)")

    CRITERION = "random"


@register_method("prune.random", RandomPruneConfig)
def _random(model: nn.Module, config: RandomPruneConfig, ctx) -> nn.Module:
    """Random pruning (seeded): the control for every criterion."""
    return run_prune(model, config, ctx, bind("random", seed=config.seed))
