"""Pruning: the configs of the ``prune`` verb, importable from a stable path.

Examples
--------
>>> from torchslim.prune import MagnitudePruneConfig, ThresholdPruneConfig
>>> MagnitudePruneConfig(sparsity=0.9).scope, ThresholdPruneConfig(alpha=0.1).scope
('global', 'layer')
"""

from .methods.prune.activation import ActivationPruneConfig
from .methods.prune.base import PruneConfig
from .methods.prune.criteria import Group
from .methods.prune.custom import config_for, register_criterion
from .methods.prune.entropy import EntropyPruneConfig
from .methods.prune.magnitude import GradualSchedule, MagnitudePruneConfig, MaskPlugin
from .methods.prune.random import RandomPruneConfig
from .methods.prune.roots import register_pruner
from .methods.prune.taylor import TaylorPruneConfig
from .methods.prune.threshold import ThresholdPruneConfig

__all__ = ["PruneConfig", "MagnitudePruneConfig", "ThresholdPruneConfig", "TaylorPruneConfig",
           "ActivationPruneConfig", "EntropyPruneConfig", "RandomPruneConfig", "MaskPlugin", "GradualSchedule",
           "Group", "register_criterion", "config_for", "register_pruner"]
