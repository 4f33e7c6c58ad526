"""``prune.taylor``: remove the units whose removal changes the loss least to first order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...registry import register_method
from .base import PruneConfig
from .dispatch import run_prune


@dataclass(frozen=True)
class TaylorPruneConfig(PruneConfig):
    """First-order Taylor importance (Molchanov et al., CVPR 2019): score = |sum of grad * weight|.

    The loss gradients are summed over ``samples`` calibration examples of the task's training
    split (eval mode: no dropout, BatchNorm statistics untouched). A single weight scores
    ``|G * w|``; a channel or head the sum of ``G * w`` over its members, in absolute value (see
    :func:`torchslim.methods.prune.criteria.taylor`). The gradients are taken again at each
    mask update: for ``schedule: gradual`` that is ``updates`` extra forward and backward passes
    over the samples, so the scores follow the fine-tuned weights rather than the initial ones.

    Needs a task with data: on a ``shape:`` task the recipe is refused at preflight.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:digits-cnn")
    >>> small = torchslim.apply(m, TaylorPruneConfig(sparsity=0.5, samples=64), task="digits")
    >>> float((small[0].weight == 0).float().mean()) > 0
    True
    """

    CRITERION = "taylor"

    @classmethod
    def example(cls) -> "TaylorPruneConfig":
        return cls(sparsity=0.5, samples=32)


@register_method("prune.taylor", TaylorPruneConfig)
def _taylor(model: nn.Module, config: TaylorPruneConfig, ctx) -> nn.Module:
    """Taylor pruning: |sum of grad * weight| on calibration data (needs a task with data)."""
    return run_prune(model, config, ctx, "taylor")
