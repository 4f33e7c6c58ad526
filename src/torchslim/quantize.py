"""Quantization: the configs of the ``quantize`` verb and the quantized layers, from a stable path.

Examples
--------
>>> from torchslim.quantize import LinearQuantConfig
>>> LinearQuantConfig(bits=4).granularity
'channel'
"""

from .layers import QuantConv2d, QuantLinear
from .methods.quantize.linear import LinearQuantConfig

__all__ = ["LinearQuantConfig", "QuantLinear", "QuantConv2d"]
