"""Which layers root a channel group: Conv/Linear and the classes users give a pruner
(:func:`register_pruner`). Kept apart from ``structured.py`` so the config (``base.py``) can check
``targets`` at preflight without importing the pruning machinery."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401 (the examples use it)
from torch import nn

from ...modules import select_modules


#: the layer classes whose output channels root a group, beside those given a pruner
ROOT_KINDS = (nn.modules.conv._ConvNd, nn.Linear)

_PRUNERS: dict[type, Any] = {}


def register_pruner(layer_class: type, pruner: Any) -> None:
    """Let channel pruning resize ``layer_class`` with ``pruner``, a torch-pruning
    ``BasePruningFunc`` (``prune_out_channels``, ``prune_in_channels``, ``get_out_channels``,
    ``get_in_channels``; set ``prune_in_channels = prune_out_channels`` for a layer whose
    input and output channels are the same ones, like a norm layer).

    Layers of the class become roots of groups when their ``get_out_channels`` is not None.
    For the artifact to rebuild a resized layer, register the class with
    :func:`torchslim.modules.register_module_class` too; otherwise its changed tensors are
    recorded as ``tensor`` edits, which is enough when the layer's shapes come from its
    tensors alone.

    Examples
    --------
    >>> import torch_pruning as tp
    >>> class Scale(nn.Module):                      # y = x * w, one w per channel
    ...     def __init__(self, c): super().__init__(); self.w = nn.Parameter(torch.ones(c, 1, 1))
    ...     def forward(self, x): return x * self.w
    >>> class ScalePruner(tp.pruner.BasePruningFunc):
    ...     def prune_out_channels(self, layer, idxs):
    ...         keep = [i for i in range(layer.w.shape[0]) if i not in set(idxs)]
    ...         layer.w = nn.Parameter(layer.w.data[keep]); return layer
    ...     prune_in_channels = prune_out_channels
    ...     def get_out_channels(self, layer): return layer.w.shape[0]
    ...     get_in_channels = get_out_channels
    >>> register_pruner(Scale, ScalePruner())
    """
    _PRUNERS[layer_class] = pruner


def channel_targets(model: nn.Module, config: Any) -> set[str]:
    """Names of the layers whose output channels ``config.targets`` pick (``config``: a
    PruneConfig): Conv/Linear layers and classes given a pruner; RecipeError for a pattern that
    matches nothing or a named module of another class."""
    kinds = ROOT_KINDS + tuple(_PRUNERS)
    return {n for n, _ in select_modules(model, config.targets, config.ignore, kinds=kinds,
                                         what="prune.targets", refuse=_refuse)}


def _refuse(module: nn.Module) -> str | None:
    if isinstance(module, ROOT_KINDS + tuple(_PRUNERS)):
        return None
    return ("channel pruning removes the output channels of Conv and Linear layers (and of classes given a "
            "pruner with torchslim.prune.register_pruner); use granularity weight for this module")
