"""``prune.activation``: remove the channels or heads whose outputs are smallest or mostly zero."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .base import PruneConfig
from .dispatch import run_prune
from .criteria import bind


@dataclass(frozen=True)
class ActivationPruneConfig(PruneConfig):
    """Rank channels (or heads) by their outputs on ``samples`` calibration examples.

    ``statistic: mean``: the mean over examples of |spatial mean of the activation| (Molchanov et
    al. 2017); ``statistic: apoz``: ``1 - APoZ``, so the units whose outputs are most often
    <= 0 (zero after the ReLU) go first (Hu et al. 2016, "Network Trimming"). A unit is measured
    where the next layer reads it: after the BatchNorm and activation module that directly
    follow its layer (a dead ReLU unit scores 0), else at the layer's output. A structured
    criterion: granularity ``channel`` (the default here), ``head`` (a head's slice of the
    attention output before the output projection) or ``layer`` (``mean`` only: the mean
    |output - input| of a residual layer, what dropping it removes); ``weight`` is refused when
    the config is built, since single weights have no output of their own.

    Needs a task with data: on a ``shape:`` task the recipe is refused at preflight.
    """

    granularity: str = option("channel", doc="channel | head | layer (units with outputs of their own)")
    statistic: str = option("mean", choices=("mean", "apoz"),
                            doc="mean: mean |activation|; apoz: 1 - average percentage of zeros")

    CRITERION = "activation"

    @classmethod
    def example(cls) -> "ActivationPruneConfig":
        return cls(sparsity=0.25, samples=32)


@register_method("prune.activation", ActivationPruneConfig)
def _activation(model: nn.Module, config: ActivationPruneConfig, ctx) -> nn.Module:
    """Activation pruning: mean |activation| or APoZ of channels on calibration data."""
    return run_prune(model, config, ctx, bind("activation", statistic=config.statistic))
