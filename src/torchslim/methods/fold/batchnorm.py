"""``fold: {method: batchnorm}``: each eval-mode BatchNorm folded into the layer feeding it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...config import option
from ...edits import replace_module
from ...modules import eval_mode, select_modules
from ...registry import register_method
from . import primitives as P
from .base import FoldConfig, OutputCheck, rebuilt
from .graph import direct_pairs, trace

log = logging.getLogger(__name__)

#: layers a BatchNorm folds into, by ``into`` word (exact classes: a subclass may compute otherwise)
INTO = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}


@dataclass(frozen=True)
class BatchNormFoldConfig(FoldConfig):
    """Fold every BatchNorm that reads only the output of a convolution (Conv1d/2d/3d) or a Linear
    into that layer, with its running statistics, and put ``nn.Identity`` in the BatchNorm's place.

    Exact in eval mode up to float rounding (see
    :func:`torchslim.methods.fold.primitives.fold_batchnorm`); the folded layer is a plain
    ``nn.Conv2d`` (or Conv1d/3d, Linear) with a bias. Pairs are found on the traced graph
    (``torch.fx``): a BatchNorm after a residual sum or a concatenation is not folded, nor one
    without running statistics (``track_running_stats=False``), nor a LayerNorm/GroupNorm (their
    statistics depend on the input). A Linear -> BatchNorm1d pair is folded when the task's
    example input shows the Linear's output is (N, C), which BatchNorm1d normalizes per feature.
    Fine-tuning a folded model trains it without BatchNorm.

    Examples
    --------
    >>> import torch, torchslim
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> type(torchslim.apply(m, BatchNormFoldConfig())[1]).__name__
    'Identity'
    """

    into: tuple[str, ...] = option(("conv", "linear"), choices=tuple(INTO),
                                   doc="which layers BatchNorms fold into: conv, linear or both")

    def check_model(self, model: nn.Module) -> None:
        """TraceError (exit 2) at preflight when the model does not trace with torch.fx."""
        trace(model, "fold.batchnorm")


def _two_dim_outputs(graph: torch.fx.Graph, model: nn.Module, names: set[str], session) -> set[str]:
    """Of the modules ``names``, those whose output is 2-D on the task's example input (none
    without a task)."""
    if not names or session is None or session.task is None:
        return set()
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.GraphModule(model, graph)
    device = next(model.parameters()).device
    inputs = [x.to(device) for x in session.task.example_inputs(2)]
    with eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in names
            and getattr(n.meta.get("tensor_meta"), "shape", ()) and len(n.meta["tensor_meta"].shape) == 2}


@register_method("fold.batchnorm", BatchNormFoldConfig)
def _fold_batchnorm(model: nn.Module, config: BatchNormFoldConfig, session) -> nn.Module:
    """Fold BatchNorm layers into the convolution or Linear before them (eval-mode equivalent)."""
    check = OutputCheck(model, session)
    kinds = tuple(k for word in config.into for k in INTO[word])
    allowed = {n for n, _ in select_modules(model, config.targets, config.ignore, kinds=kinds,
                                            what="fold.targets")}
    graph = trace(model, "fold.batchnorm")
    pairs = [(a, b) for a, b in direct_pairs(graph, model, kinds, (nn.modules.batchnorm._BatchNorm,))
             if a in allowed and type(model.get_submodule(a)) in kinds]
    linears = {a for a, _ in pairs if isinstance(model.get_submodule(a), nn.Linear)}
    flat = _two_dim_outputs(graph, model, linears, session)
    folded = []
    for a, b in pairs:
        layer, bn = model.get_submodule(a), model.get_submodule(b)
        if bn.running_mean is None or bn.running_var is None:
            log.info("fold.batchnorm: %s keeps %s: it has no running statistics", a, b)
            continue
        if a in linears and a not in flat:
            log.info("fold.batchnorm: %s keeps %s: the Linear's output is not shown (N, C) by the task's "
                     "example input", a, b)
            continue
        w, bias = P.fold_batchnorm(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                   bn.weight, bn.bias)
        replace_module(model, a, rebuilt(layer, w, bias, {"bias": True}))
        replace_module(model, b, nn.Identity())
        folded.append(b)
    if folded:
        log.info("fold.batchnorm: %d BatchNorm layer(s) folded: %s%s", len(folded), ", ".join(folded[:6]),
                 " ..." if len(folded) > 6 else "")
    else:
        session.warn("nothing_folded", "fold.batchnorm: no targeted convolution or Linear feeds a BatchNorm "
                                       "directly; the model is unchanged")
    session.info.setdefault("metrics", {})["folded"] = folded
    check.record(model)
    return model
