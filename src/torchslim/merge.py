"""Model merging: the configs of the ``merge`` verb.

Examples
--------
>>> from torchslim.merge import TiesMergeConfig
>>> c = TiesMergeConfig(models=("zoo:lenet-5",))   # the current model is the base
>>> c.refs()[1], c.models[0].spec, c.density
('current', 'zoo:lenet-5', 0.2)
"""

from .methods.merge.soups import GreedySoupConfig, SlerpConfig, UniformMergeConfig
from .methods.merge.task_vectors import DareMergeConfig, TaskArithmeticConfig, TiesMergeConfig

__all__ = ["UniformMergeConfig", "GreedySoupConfig", "SlerpConfig", "TaskArithmeticConfig", "TiesMergeConfig",
           "DareMergeConfig"]
