"""Folding: the configs of the ``fold`` verb, from a stable path.

Examples
--------
>>> from torchslim.fold import BatchNormFoldConfig
>>> BatchNormFoldConfig().into
('conv', 'linear')
"""

from .methods.fold.base import FoldConfig
from .methods.fold.batchnorm import BatchNormFoldConfig
from .methods.fold.identity import IdentityFoldConfig
from .methods.fold.linear import LinearFoldConfig

__all__ = ["FoldConfig", "BatchNormFoldConfig", "LinearFoldConfig", "IdentityFoldConfig"]
