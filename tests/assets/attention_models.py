"""Small attention models for the head and layer pruning tests (``py:`` model specs): the
torchvision ViT and Swin architectures at a few layers, narrow widths and 32x32 inputs, and an
attention classifier for the digits task."""

import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer


def small_vit(layers: int = 2):
    """Images (B, 3, 32, 32) -> (B, 10): 4 patches + class token, 4 heads of 16, ``layers`` blocks."""
    return VisionTransformer(image_size=32, patch_size=16, num_layers=layers, num_heads=4, hidden_dim=64,
                             mlp_dim=128, num_classes=10)


def small_swin():
    """Images (B, 3, 32, 32) -> (B, 10): stages of 2 blocks (2 then 4 heads of 16), 4x4 windows;
    stage 1 (8x8 tokens) shifts its second block's windows."""
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.0, num_classes=10)


class DigitsAttention(nn.Module):
    """Digits (B, 1, 8, 8) -> logits (B, 10): the 8 image rows as tokens, one 4-head attention
    with a residual, mean pooling; a task with data for the criteria that need gradients."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x[:, 0])                                       # (B, 8 rows, 16)
        h = t + self.att(t, t, t, need_weights=False)[0]
        return self.head(h.mean(dim=1))                               # (B, 10)


def digits_attention():
    return DigitsAttention()


class DigitsEncoder(nn.Module):
    """Digits (B, 1, 8, 8) -> logits (B, 10): the 8 image rows as tokens, an nn.TransformerEncoder
    of ``layers`` post-norm layers (4 heads of 4 at width 16, no dropout), mean pooling; for the
    head and layer schedules, which fine-tune on data."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x[:, 0])).mean(dim=1))   # (B, 8, 16) -> (B, 10)


def digits_encoder(layers: int = 3):
    return DigitsEncoder(layers)
