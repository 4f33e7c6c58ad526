"""Small real architectures for the registry contract tests (loaded as ``py:`` model specs):
a transformer encoder with ``nn.MultiheadAttention``, an MLP whose two layers share one
weight (tied), and a network with one layer of each other weight-holding kind."""

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


class MixedLayers(nn.Module):
    """Token ids (B, T) -> logits (B, classes) through Embedding, Conv1d, LSTM, ConvTranspose2d and
    Linear: every kind of weight tensor besides Linear/Conv2d."""

    def __init__(self, vocab: int = 64, dim: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.up = nn.ConvTranspose2d(1, 2, 2, stride=2)
        self.head = nn.Linear(2 * 8 * dim // 2, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)                                      # (B, T, dim)
        h = self.conv(h.transpose(1, 2)).relu().transpose(1, 2)  # (B, T, dim)
        h, _ = self.lstm(h)                                      # (B, T, dim)
        h = h.mean(dim=1).reshape(h.shape[0], 1, 4, -1)          # (B, 1, 4, dim / 4)
        return self.head(self.up(h).flatten(1))                  # (B, 2, 8, dim / 2) -> (B, classes)


def mixed():
    return MixedLayers()


def encoder(layers: int = 2):
    return Encoder(layers=layers)


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
