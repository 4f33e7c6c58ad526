"""Narrow float storage (``quantize: {method: float}``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .coded import CodedQuantConfig, run_coded

#: ``dtype`` (and ``fp8_format``) -> the stored torch dtype's name
STORAGE = {"bf16": "bfloat16", "fp16": "float16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class FloatQuantConfig(CodedQuantConfig):
    """Weights stored as a narrower float: ``bf16``, ``fp16`` or ``fp8`` (``fp8_format``
    ``e4m3``, 3 mantissa bits, up to 448, or ``e5m2``, 2 mantissa bits, up to 57344), rounded to
    nearest even. fp8 weights get a float32 scale per output channel that maps the channel's
    max ``|w|`` to the format's largest value (Micikevicius et al. 2022). The artifact stores the
    narrow dtype; the forward upcasts to the input's dtype, so the model's activations and
    outputs keep their dtype.

    Examples
    --------
    >>> import torchslim
    >>> q = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), FloatQuantConfig(dtype="fp8"))
    >>> q[1].weight_q.dtype
    torch.float8_e4m3fn
    """

    dtype: str = option("bf16", choices=("bf16", "fp16", "fp8"), doc="storage format of the weights")
    fp8_format: str = option("e4m3", choices=("e4m3", "e5m2"), doc="the fp8 format (dtype: fp8)")

    SCHEME = "float"

    def layer_coding(self, name: str) -> tuple[int, str]:
        storage = STORAGE[self.fp8_format if self.dtype == "fp8" else self.dtype]
        return (8 if self.dtype == "fp8" else 16), storage

    @classmethod
    def example(cls) -> "FloatQuantConfig":
        return cls(dtype="fp8")   # a quarter of float32, as int8 codes are


@register_method("quantize.float", FloatQuantConfig)
def _float_quant(model: nn.Module, config: FloatQuantConfig, session) -> nn.Module:
    """Weights stored as bf16, fp16 or fp8 (e4m3/e5m2, scaled per channel), upcast to compute."""
    return run_coded(model, config, session)
