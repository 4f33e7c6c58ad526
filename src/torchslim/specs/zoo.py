"""Built-in architectures for ``zoo:NAME`` specs."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ZOO: dict[str, Callable[..., nn.Module]] = {}


def register_zoo(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ZOO[name] = fn
        return fn
    return deco


@register_zoo("lenet-300-100")
def lenet_300_100(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    """LeNet-300-100: the fully connected MNIST net of Han et al. (266K params)."""
    return nn.Sequential(
        nn.Flatten(),                      # (N, 1, 28, 28) -> (N, 784)
        nn.Linear(in_features, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_zoo("mlp")
def mlp(num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] | list[int] = (1200, 1200),
        dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Module:
    """A fully connected ReLU net on flattened inputs: ``(N, ...) -> (N, num_classes)``.

    ``hidden`` lists the widths (Hinton et al. 2015's MNIST teacher is ``[1200, 1200]`` with
    ``dropout: 0.5, input_dropout: 0.2``, their student ``[800, 800]`` without dropout).
    ``dropout`` follows every hidden layer, ``input_dropout`` the input (Srivastava et al. 2014).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_zoo("lenet-5")
def lenet_5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5, Caffe variant: conv20 -> pool -> conv50 -> pool -> fc500 -> fc10 (431,080 params)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2),   # (N, 20, 12, 12)
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),            # (N, 50, 4, 4)
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


@register_zoo("digits-cnn")
def digits_cnn(num_classes: int = 10, channels: tuple[int, int] | list[int] = (32, 64),
               hidden: int = 128, dropout: float = 0.2) -> nn.Module:
    """A small CNN for 8x8 digit images; ``channels``/``hidden`` shrink it into a student."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),        # (N, c1, 8, 8)
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                   # (N, c2, 4, 4)
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden), nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


@register_zoo("resnet-fmnist")
def resnet_fmnist(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] | list[int] = (16, 32, 64),
                  blocks: int = 2) -> nn.Module:
    """A ResNet-style CNN for 28x28 images (Fashion-MNIST, MNIST): a 3x3 stem, three stages of
    ``blocks`` torchvision BasicBlocks (widths 16/32/64, stride 2 between stages, 1x1 projection
    shortcuts), global average pooling and a linear classifier (175K params, 20.2M MACs).

    Residual adds couple the channels of each stage, which structured pruning must respect."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]   # (N, 16, 28, 28)
    c_in = widths[0]
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2                                                 # 28 -> 14 -> 7
        for b in range(blocks):
            down = None
            if b == 0 and (stride != 1 or c_in != width):
                down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(c_in, width, stride=stride if b == 0 else 1, downsample=down))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]   # (N, 64) -> (N, 10)
    return nn.Sequential(*layers)
