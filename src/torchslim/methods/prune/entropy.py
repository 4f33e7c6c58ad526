"""``prune.entropy``: remove the channels whose pooled output varies least between examples."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .base import PruneConfig
from .dispatch import run_prune
from .criteria import bind


@dataclass(frozen=True)
class EntropyPruneConfig(PruneConfig):
    """Rank channels by the entropy of their global-average-pooled output over ``samples``
    calibration examples, in a histogram of ``bins`` bins (Luo & Wu 2017): low entropy, little
    information, removed first. The output is read after the BatchNorm and activation module that
    directly follow the channel's layer (a unit dead after its ReLU: entropy 0).

    A structured criterion: granularity ``channel`` (the default here) or ``head`` (the mean
    |value| of a head's slice of the attention output, per example); ``weight`` and ``layer``
    are refused when the config is built (a histogram over a layer's own range does not see the
    size of its residual update, which is what dropping it removes: use ``activation``). With few samples per bin the histogram is noisy: keep
    ``samples`` at several times ``bins``.

    Needs a task with data: on a ``shape:`` task the recipe is refused at preflight.
    """

    granularity: str = option("channel", doc="channel | head (units with outputs of their own)")
    bins: int = option(16, low=2, doc="histogram bins over each channel's range of pooled outputs")

    CRITERION = "entropy"

    @classmethod
    def example(cls) -> "EntropyPruneConfig":
        return cls(sparsity=0.25, samples=64, bins=8)


@register_method("prune.entropy", EntropyPruneConfig)
def _entropy(model: nn.Module, config: EntropyPruneConfig, ctx) -> nn.Module:
    """Entropy pruning: entropy of each channel's pooled activation on calibration data."""
    return run_prune(model, config, ctx, bind("entropy", bins=config.bins))
