"""Small digits models (1x8x8 inputs, 10 classes) whose forward returns several outputs."""

from collections import namedtuple

import torch
from torch import nn

Outputs = namedtuple("Outputs", ["logits", "features"])


class _Net(nn.Module):
    def __init__(self, kind: str, hidden: int = 16) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor):
        feats = self.body(x)              # (N, hidden)
        logits = self.head(feats)         # (N, 10)
        if self.kind == "tuple":
            return logits, feats
        if self.kind == "dict":
            return {"logits": logits, "aux": feats}
        if self.kind == "named":
            return Outputs(logits, feats)
        if self.kind == "train-tuple":
            return (logits, feats) if self.training else logits
        return {"scores": logits, "features": feats}


def tuple_net(hidden: int = 16) -> nn.Module:
    """Returns ``(logits, features)``."""
    return _Net("tuple", hidden)


def dict_net(hidden: int = 16) -> nn.Module:
    """Returns ``{"logits": ..., "aux": ...}``."""
    return _Net("dict", hidden)


def named_net(hidden: int = 16) -> nn.Module:
    """Returns a namedtuple ``Outputs(logits, features)``."""
    return _Net("named", hidden)


def scores_net(hidden: int = 16) -> nn.Module:
    """Returns ``{"scores": ..., "features": ...}`` (no ``logits`` key)."""
    return _Net("scores", hidden)


def train_tuple_net(hidden: int = 16) -> nn.Module:
    """Returns ``(logits, features)`` in train mode, ``logits`` in eval mode."""
    return _Net("train-tuple", hidden)
