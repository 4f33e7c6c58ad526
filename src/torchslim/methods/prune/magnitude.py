"""``prune.magnitude``: remove the weights, channels, heads or layers of smallest L1 norm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...registry import register_method
from .base import PATTERN_KINDS, PruneConfig, prunable_weights  # noqa: F401 (public names)
from .dispatch import run_prune
from .unstructured import COLLAPSE, GradualSchedule, MaskPlugin  # noqa: F401 (public names)


@dataclass(frozen=True)
class MagnitudePruneConfig(PruneConfig):
    """Remove the smallest-magnitude weights (Han et al. 2015) or groups (L1 norm, Li et al. 2017).

    With granularity ``weight``, every weight tensor of a targeted module is pruned: ``weight``
    of Linear, Conv1d/2d/3d, ConvTranspose and Embedding, ``weight_ih_l*``/``weight_hh_l*`` of
    LSTM/GRU/RNN, the packed ``in_proj_weight`` (or ``q/k/v_proj_weight``) of
    ``nn.MultiheadAttention``; never biases or norm scales. ``re:`` patterns pick Linear,
    convolutions, MultiheadAttention and recurrent layers; an Embedding (or any other module
    with weights) is pruned when named exactly. A named module without weights of its own (a
    norm layer, a block) is refused.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> small = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.9, scope="layer"))
    >>> round(float((small[1].weight == 0).float().mean()), 2)
    0.9
    """

    CRITERION = "magnitude"


@register_method("prune.magnitude", MagnitudePruneConfig)
def _magnitude(model: nn.Module, config: MagnitudePruneConfig, ctx) -> nn.Module:
    """Magnitude pruning (global or per layer; one-shot, gradual or iterative)."""
    return run_prune(model, config, ctx, "magnitude")
