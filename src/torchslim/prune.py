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

__all__ = ["PruneConfig", "MagnitudePruneConfig", "MaskPlugin", "GradualSchedule", "Group", "register_criterion"]
