"""Ternary weights (``quantize: {method: ternary}``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from .coded import QatCodedQuantConfig, run_coded


@dataclass(frozen=True)
class TernaryQuantConfig(QatCodedQuantConfig):
    """Ternary Weight Networks (Li & Liu 2016, eq. 9-10): per output channel, weights with
    ``|w| <= 0.7 * mean |w|`` become 0 and the others ``alpha * sign(w)``, ``alpha`` the mean
    ``|w|`` above the threshold. Codes -1/0/1 take 2 bits (fewer once entropy-coded: about 40%
    of them are 0). With ``qat`` the model first trains with every coded weight replaced by its
    ternary value in the forward pass (threshold and ``alpha`` recomputed from ``w`` at each
    step, as TWN trains, eq. 7-10) and the gradient passed straight through to ``w``, then the
    trained weights are coded, so the stored model computes what the last training forward
    computed.

    Examples
    --------
    >>> import torchslim
    >>> q = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), TernaryQuantConfig())
    >>> sorted(q[1].weight_q.unique().tolist())
    [-1, 0, 1]
    >>> TernaryQuantConfig.from_dict({"qat": {"epochs": 2, "lr": 0.01}}).qat.epochs   # needs a task to run
    2
    """

    bits: int = option(2, choices=(2,), doc="bits per weight code (2: -1, 0, 1)")

    SCHEME = "ternary"
    OUTPUT_COSINE = 0.3
    KEEPS_NONZEROS = False

    def layer_coding(self, name: str) -> tuple[int, None]:
        return self.bits, None


@register_method("quantize.ternary", TernaryQuantConfig)
def _ternary_quant(model: nn.Module, config: TernaryQuantConfig, session) -> nn.Module:
    """Ternary weights (TWN): 0 below 0.7 mean |w|, else sign(w) times the mean |w| above it."""
    return run_coded(model, config, session)
