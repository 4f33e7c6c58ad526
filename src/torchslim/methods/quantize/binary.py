"""Binary weights (``quantize: {method: binary}``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .coded import QatCodedQuantConfig, run_coded


@dataclass(frozen=True)
class BinaryQuantConfig(QatCodedQuantConfig):
    """Binary weights ``alpha * sign(w)`` with ``alpha`` the mean ``|w|`` of each output
    channel (XNOR-Net, Rastegari et al. 2016, eq. 2-4; BinaryConnect, Courbariaux et al. 2015):
    1 bit a weight in the artifact. Post-training binarization costs accuracy that training
    with the binary weights recovers: with ``qat`` the model first trains with every coded
    weight replaced by ``alpha * sign(w)`` in the forward pass and the gradient passed straight
    through to ``w`` (BinaryConnect's straight-through estimator; ``alpha`` recomputed from ``w``
    at each step), then the trained weights are coded, so the stored model computes what the
    last training forward computed.

    Examples
    --------
    >>> import torchslim
    >>> q = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), BinaryQuantConfig())
    >>> sorted(q[1].weight_q.unique().tolist())
    [0, 1]
    >>> BinaryQuantConfig.from_dict({"qat": {"epochs": 2, "lr": 0.01}}).qat.epochs   # needs a task to run
    2
    """

    bits: int = option(1, choices=(1,), doc="bits per weight (1: the sign)")

    SCHEME = "binary"
    OUTPUT_COSINE = 0.3   # post-training, through a random-init ResNet-18

    def layer_coding(self, name: str) -> tuple[int, None]:
        return self.bits, None


@register_method("quantize.binary", BinaryQuantConfig)
def _binary_quant(model: nn.Module, config: BinaryQuantConfig, session) -> nn.Module:
    """Binary weights: sign(w) times the mean |w| of its output channel (XNOR-Net)."""
    return run_coded(model, config, session)
