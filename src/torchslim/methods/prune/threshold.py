"""``prune.threshold``: remove what falls under a fraction ``alpha`` of its layer's largest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import option
from ...errors import RecipeError
from ...registry import register_method
from .base import PruneConfig
from .dispatch import run_prune


@dataclass(frozen=True)
class ThresholdPruneConfig(PruneConfig):
    """Remove every weight with ``|w| < alpha * max|w|`` of its layer (Han et al. 2015, sec. 3).

    The fraction removed is the *result* of ``alpha`` and the weights, not an input:
    ``sparsity`` stays 0 (another value is refused, naming ``prune.magnitude`` for a target
    sparsity), and the step's ``layer_sparsity`` row says what was removed. With granularity
    ``channel`` (or ``head``, ``layer``), a group goes when its L1 norm is below ``alpha`` times
    the largest group norm in its layer. ``scope: layer`` (the default) takes the maximum per
    layer; ``scope: global`` one maximum over every target.

    Schedules: ``oneshot``, optionally fine-tuned with the masks held (they are not re-drawn
    after fine-tuning); ``iterative`` applies the rule again after each fine-tuning round, to
    the weights as trained (pruned ones stay pruned); ``gradual`` has no sparsity to ramp and is
    refused. ``max_layer_sparsity`` caps a ranking and is refused too.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> w = m[1].weight
    >>> small = torchslim.apply(m, ThresholdPruneConfig(alpha=0.5))
    >>> bool(((small[1].weight == 0) == (w.abs() < 0.5 * w.abs().max())).all())
    True
    """

    sparsity: float = option(0.0, low=0.0, high=1.0, high_open=True,
                             doc="not an input: the fraction removed is the result of alpha (leave 0)")
    scope: str = option("layer", choices=("global", "layer"),
                        doc="layer: alpha times each layer's largest score; global: times the largest of all")
    alpha: float | None = option(None, low=0.0, high=1.0, low_open=True, high_open=True,
                                 doc="required: a unit goes when its score < alpha * the largest (0 < alpha < 1)")

    CRITERION = "threshold"
    SPARSITY_IS_RESULT = True

    def validate(self) -> None:
        super().validate()
        cls = type(self).__name__
        if self.alpha is None:
            raise RecipeError(f"{cls}.alpha: required: weights with |w| < alpha * max|w| of their layer are "
                              "removed (e.g. alpha: 0.1)")
        if self.sparsity != 0.0:
            raise RecipeError(f"{cls}.sparsity: threshold pruning removes what falls under alpha * max, so the "
                              f"sparsity is its result, not an input (got {self.sparsity}); leave sparsity out, "
                              "or use prune.magnitude for a target sparsity")
        if self.schedule == "gradual":
            raise RecipeError(f"{cls}.schedule: gradual ramps a target sparsity, which threshold pruning does not "
                              "have; use oneshot or iterative (the rule applied after each fine-tuning round)")
        if self.max_layer_sparsity != 1.0:
            raise RecipeError(f"{cls}.max_layer_sparsity: caps a ranking; threshold pruning keeps every unit at "
                              "or above alpha * max, so at least one per layer; leave it at 1.0")

    def keep_masks(self, scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        """Keep a unit when its score >= ``alpha`` times the largest score of its tensor
        (``scope: layer``) or of all tensors (``scope: global``); ``sparsity`` is ignored."""
        if self.scope == "global":
            top = max(float(s.max()) for s in scores) if scores else 0.0
            return [s >= self.alpha * top for s in scores]
        return [s >= self.alpha * s.max() for s in scores]

    def kept_everything(self) -> str:
        return (f"every score is at least alpha {self.alpha:g} times the largest of its "
                f"{'layer' if self.scope == 'layer' else 'targets'}; raise alpha (the fraction removed follows it)")

    @classmethod
    def example(cls) -> "ThresholdPruneConfig":
        return cls(alpha=0.1)


@register_method("prune.threshold", ThresholdPruneConfig)
def _threshold(model: nn.Module, config: ThresholdPruneConfig, ctx) -> nn.Module:
    """Threshold pruning: remove |w| < alpha * max|w| per layer (sparsity is the result)."""
    return run_prune(model, config, ctx, "threshold")
