"""Pruning: the configs of the ``prune`` verb, importable from a stable path.

Examples
--------
>>> from torchslim.prune import MagnitudePruneConfig
>>> MagnitudePruneConfig(sparsity=0.9).scope
'global'
"""

from .methods.prune.base import PruneConfig
from .methods.prune.criteria import Group, register_criterion
from .methods.prune.magnitude import GradualSchedule, MagnitudePruneConfig, MaskPlugin
from .methods.prune.structured import register_pruner

__all__ = ["PruneConfig", "MagnitudePruneConfig", "MaskPlugin", "GradualSchedule", "Group", "register_criterion",
           "register_pruner"]
