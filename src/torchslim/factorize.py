"""Low-rank factorization: the configs of the ``factorize`` verb and the factorized layers, from a
stable path.

Examples
--------
>>> from torchslim.factorize import SVDFactorizeConfig
>>> SVDFactorizeConfig(rank=0.8).rank
0.8
"""

from .layers import CPConv2d, LowRankLinear, TuckerConv2d
from .methods.factorize.base import FactorizeConfig
from .methods.factorize.cp import CPFactorizeConfig
from .methods.factorize.svd import SVDFactorizeConfig
from .methods.factorize.tucker import TuckerFactorizeConfig

__all__ = ["FactorizeConfig", "SVDFactorizeConfig", "TuckerFactorizeConfig", "CPFactorizeConfig",
           "LowRankLinear", "TuckerConv2d", "CPConv2d"]
