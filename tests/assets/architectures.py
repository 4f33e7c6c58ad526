"""Small real architectures for the registry contract tests (loaded as ``py:`` model specs):
a transformer encoder with ``nn.MultiheadAttention``, and an MLP whose two layers share one
weight (tied)."""

import torch
from torch import nn


class Encoder(nn.Module):
    """Token ids (B, T) -> class logits (B, classes): embedding, 2 TransformerEncoderLayers, mean pool."""

    def __init__(self, vocab: int = 2048, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids))         # (B, T, dim)
        return self.head(h.mean(dim=1))           # (B, classes)


class TiedMLP(nn.Module):
    """x (B, 32) -> (B, 32); ``b.weight`` is ``a.weight``."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def encoder():
    return Encoder()


def tied_mlp():
    return TiedMLP()


class BNConvNet(nn.Module):
    """(B, 1, 8, 8) digits -> (B, 10) logits: two conv-BatchNorm-ReLU blocks, a linear head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(8 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def bn_convnet():
    return BNConvNet()
