"""``train`` steps: (re)train the current model with SGD or AdamW."""

from __future__ import annotations

from torch import nn

from ..registry import register_method
from ..train.config import AdamWTrainConfig, SGDTrainConfig


@register_method("train.sgd", SGDTrainConfig)
def _train_sgd(model: nn.Module, config: SGDTrainConfig, ctx) -> nn.Module:
    """Train with SGD (momentum) and the configured schedule."""
    return ctx.train(model, config, desc="train")


@register_method("train.adamw", AdamWTrainConfig)
def _train_adamw(model: nn.Module, config: AdamWTrainConfig, ctx) -> nn.Module:
    """Train with AdamW (decoupled weight decay) and the configured schedule."""
    return ctx.train(model, config, desc="train")
