"""Power-of-two weights (``quantize: {method: log}``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .coded import CodedQuantConfig, run_coded


@dataclass(frozen=True)
class LogQuantConfig(CodedQuantConfig):
    """Logarithmic quantization (Miyashita et al. 2016): each weight becomes
    ``scale * sign * 2**-e`` with one scale per output channel (its max ``|w|``), ``e`` in
    ``0 .. 2**(bits-1) - 2``, or 0 (:func:`~torchslim.methods.quantize.primitives.quantize_log`);
    one bit of the code is the sign. Multiplying by a power of two is a shift, which is what
    hardware gains; here the forward decodes to float. The error of a weight is at most half the
    gap between the two levels around it (a third of its value), whatever ``bits``: more bits
    reach smaller weights, not finer ones.

    Examples
    --------
    >>> import torchslim
    >>> q = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), LogQuantConfig(bits=4))
    >>> int(q[1].weight_q.abs().max()) <= 7
    True
    """

    bits: int = option(4, low=2, high=8, doc="bits per weight code: a sign and 2**(bits-1) - 1 powers of two")

    SCHEME = "log"
    OUTPUT_COSINE = 0.9   # about 12 dB of SQNR per layer, through a random-init ResNet-18

    def layer_coding(self, name: str) -> tuple[int, None]:
        return self.bits, None


@register_method("quantize.log", LogQuantConfig)
def _log_quant(model: nn.Module, config: LogQuantConfig, session) -> nn.Module:
    """Power-of-two weight levels: a sign and an exponent per weight, a scale per output channel."""
    return run_coded(model, config, session)
