"""What every folding method shares: ``targets``/``ignore`` and rebuilding a layer with new tensors.

Folding changes the architecture without changing what the model computes in eval mode (up to
float rounding); each change goes through :func:`torchslim.edits.replace_module` /
:func:`~torchslim.edits.delete_module`, so a folded model saves and reloads as plain torch.nn
layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import MethodConfig, option
from ...modules import build_from_record, module_rebuild_record


@dataclass(frozen=True)
class FoldConfig(MethodConfig):
    """Fields every folding method accepts (CONTRACT §4, ``fold``)."""

    targets: tuple[str, ...] = option(("re:.*",), doc="module names or re: patterns of the layers folded into "
                                                     "(the convolution or Linear that stays)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left as they are")


def rebuilt(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, args: dict | None = None) -> nn.Module:
    """A new module of ``layer``'s (registered) class and constructor arguments, with ``args``
    overriding some (``{"bias": True, "out_features": 10}``), holding ``weight`` and ``bias``, on
    ``weight``'s device and dtype and in ``layer``'s train/eval mode."""
    record = module_rebuild_record(layer)
    record["args"].update(args or {})
    new = build_from_record(record).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(layer.training)
