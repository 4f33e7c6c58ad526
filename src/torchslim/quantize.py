"""Quantization: the configs of the ``quantize`` verb and the quantized layers, from a stable path.

Examples
--------
>>> from torchslim.quantize import KMeansQuantConfig, LinearQuantConfig
>>> LinearQuantConfig(bits=4).granularity
'channel'
>>> KMeansQuantConfig(bits=5, layer_bits={"0": 8}).layer_bits
{'0': 8}
"""

from .layers import CodedConv2d, CodedEmbedding, CodedLinear, QuantConv2d, QuantLinear
from .methods.quantize.binary import BinaryQuantConfig
from .methods.quantize.calibration import CalibrationConfig
from .methods.quantize.float import FloatQuantConfig
from .methods.quantize.gptq import GPTQConfig
from .methods.quantize.kmeans import KMeansQuantConfig
from .methods.quantize.linear import LinearQuantConfig
from .methods.quantize.log import LogQuantConfig
from .methods.quantize.ternary import TernaryQuantConfig

__all__ = ["LinearQuantConfig", "KMeansQuantConfig", "LogQuantConfig", "BinaryQuantConfig", "TernaryQuantConfig",
           "FloatQuantConfig", "GPTQConfig", "CalibrationConfig",
           "QuantLinear", "QuantConv2d", "CodedLinear", "CodedConv2d", "CodedEmbedding"]
