"""``fold: {method: linear}``: consecutive Linear layers with nothing between them fused into one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ...config import option
from ...edits import replace_module
from ...modules import select_modules
from ...registry import register_method
from . import primitives as P
from .base import FoldConfig, OutputCheck, rebuilt
from .graph import chains, direct_pairs, trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearFoldConfig(FoldConfig):
    """Fuse a Linear that reads only the output of another Linear into it: ``L2(L1(x))`` becomes
    one ``nn.Linear`` with ``W = W2 W1``, ``b = W2 b1 + b2`` (exact up to float rounding) in
    ``L1``'s place, and ``nn.Identity`` in ``L2``'s. Chains fuse left to right.

    A pair is fused only when the fused layer holds at most ``max_growth`` times the weights of
    the two (``in1 * out2 <= max_growth * (in1 * hidden + hidden * out2)``): with the default 1.0
    a bottleneck (768 -> 64 -> 768, or a ``LowRankLinear`` from ``factorize``) stays two layers,
    since fusing it would grow the model. Pairs come from the traced graph (``torch.fx``).

    Examples
    --------
    >>> import torch, torchslim
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    >>> torchslim.apply(m, LinearFoldConfig())[0].weight.shape
    torch.Size([2, 8])
    """

    max_growth: float = option(1.0, low=0.0, low_open=True,
                               doc="fuse a pair when the fused weights are at most this times the pair's")

    def check_model(self, model: nn.Module) -> None:
        """TraceError (exit 2) at preflight when the model does not trace with torch.fx."""
        trace(model, "fold.linear")


def _weights(layer: nn.Linear) -> int:
    return layer.in_features * layer.out_features


@register_method("fold.linear", LinearFoldConfig)
def _fold_linear(model: nn.Module, config: LinearFoldConfig, session) -> nn.Module:
    """Fuse consecutive Linear layers (nothing between them) into one."""
    check = OutputCheck(model, session)
    allowed = {n for n, _ in select_modules(model, config.targets, config.ignore, kinds=(nn.Linear,),
                                            what="fold.targets")}
    graph = trace(model, "fold.linear")
    pairs = [(a, b) for a, b in direct_pairs(graph, model, (nn.Linear,), (nn.Linear,))
             if a in allowed and b in allowed and type(model.get_submodule(a)) is nn.Linear
             and type(model.get_submodule(b)) is nn.Linear]
    fused = []
    for chain in chains(pairs):
        head = chain[0]
        for name in chain[1:]:
            first, second = model.get_submodule(head), model.get_submodule(name)
            grown = first.in_features * second.out_features
            if grown > config.max_growth * (_weights(first) + _weights(second)):
                log.info("fold.linear: %s and %s stay apart: fused, %d weights instead of %d", head, name, grown,
                         _weights(first) + _weights(second))
                head = name
                continue
            w, b = P.fuse_linear(first.weight, first.bias, second.weight, second.bias)
            replace_module(model, head, rebuilt(first, w, b, {"out_features": second.out_features,
                                                               "bias": b is not None}))
            replace_module(model, name, nn.Identity())
            fused.append(f"{head}+{name}")
    if not fused:
        session.warn("nothing_folded", "fold.linear: no targeted Linear reads only another Linear's output "
                                       "(or fusing would grow the model); the model is unchanged")
    session.info.setdefault("metrics", {})["folded"] = fused
    check.record(model)
    return model
