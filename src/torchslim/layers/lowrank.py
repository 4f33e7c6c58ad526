"""Factorized layers: ``LowRankLinear`` (SVD), ``TuckerConv2d`` (Tucker-2) and ``CPConv2d`` (CP).

Each is a small chain of plain ``nn.Linear`` / ``nn.Conv2d`` children, so parameters, MACs,
ONNX export and training need nothing special: the factors are ordinary parameters and count as
such. They live in the core (not in the ``factorize`` method package) so that an artifact loads
without any method imported; each registers with :func:`torchslim.modules.register_module_class`
and gives its constructor arguments through ``rebuild_args()``. The factors are computed by
``torchslim.methods.factorize.primitives``; these classes only hold and apply them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules import register_module_class


def _kernel(k: Any) -> list[int]:
    return [int(v) for v in k]


@register_module_class
class LowRankLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` as two Linears through ``rank`` features:
    x (*, in) -> ``first`` (*, rank) -> ``second`` (*, out); the bias sits on ``second``.

    With ``W ~ U_r diag(s_r) V_r^T`` (``W``: [out, in]), ``first.weight = diag(sqrt s_r) V_r^T``
    ([rank, in]) and ``second.weight = U_r diag(sqrt s_r)`` ([out, rank]); weights:
    ``rank * (in + out)`` instead of ``in * out``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    bias=self.second.bias is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.rank} -> {self.out_features}"


def _conv_geometry(stride: Any, padding: Any, dilation: Any) -> dict[str, Any]:
    return dict(stride=_kernel(stride), padding=padding if isinstance(padding, str) else _kernel(padding),
                dilation=_kernel(dilation))


@register_module_class
class TuckerConv2d(nn.Module):
    """``nn.Conv2d`` (groups 1) factorized by Tucker-2 over its output and input channels
    (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for Fast and Low
    Power Mobile Applications"): x (N, C_in, H, W) -> ``first`` 1x1 conv (N, r_in, H, W) ->
    ``core`` k_h x k_w conv with the original stride, padding and dilation (N, r_out, H', W') ->
    ``last`` 1x1 conv with the bias (N, C_out, H', W').

    ``W[o, i, h, w] ~ sum core[a, b, h, w] U_out[o, a] U_in[i, b]``: ``first.weight = U_in^T``,
    ``core.weight = core``, ``last.weight = U_out``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], rank_in: int,
                 rank_out: int, stride: list[int] | None = None, padding: list[int] | str = (0, 0),
                 dilation: list[int] | None = None, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank_in, self.rank_out = in_channels, out_channels, rank_in, rank_out
        self.kernel_size = _kernel(kernel_size)
        self.geometry = _conv_geometry(stride or (1, 1), padding, dilation or (1, 1))
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, tuple(self.kernel_size), bias=False,
                              stride=tuple(self.geometry["stride"]), dilation=tuple(self.geometry["dilation"]),
                              padding=self.geometry["padding"] if isinstance(self.geometry["padding"], str)
                              else tuple(self.geometry["padding"]))
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    rank_in=self.rank_in, rank_out=self.rank_out, **self.geometry, bias=self.last.bias is not None)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.rank_in} -> k={self.kernel_size} -> {self.rank_out} -> "
                f"{self.out_channels}")


@register_module_class
class CPConv2d(nn.Module):
    """``nn.Conv2d`` (groups 1) as a rank-``rank`` CP decomposition in four convolutions
    (Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks Using Fine-tuned
    CP-Decomposition", eq. 3-6): x (N, C_in, H, W) -> ``first`` 1x1 (N, R, H, W) ->
    ``vertical`` k_h x 1 depthwise (N, R, H', W) -> ``horizontal`` 1 x k_w depthwise
    (N, R, H', W') -> ``last`` 1x1 with the bias (N, C_out, H', W').

    ``W[o, i, h, w] ~ sum_r A[o, r] B[i, r] C[h, r] D[w, r]``: ``first.weight = B^T``,
    ``vertical.weight = C^T``, ``horizontal.weight = D^T``, ``last.weight = A``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], rank: int,
                 stride: list[int] | None = None, padding: list[int] | str = (0, 0),
                 dilation: list[int] | None = None, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size = _kernel(kernel_size)
        self.geometry = _conv_geometry(stride or (1, 1), padding, dilation or (1, 1))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.geometry["stride"], self.geometry["dilation"]
        pad = self.geometry["padding"]
        ph, pw = (pad, pad) if isinstance(pad, str) else pad
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), dilation=(dh, 1), groups=rank, bias=False,
                                  padding=ph if isinstance(ph, str) else (ph, 0))
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), dilation=(1, dw), groups=rank, bias=False,
                                    padding=pw if isinstance(pw, str) else (0, pw))
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    rank=self.rank, **self.geometry, bias=self.last.bias is not None)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.rank} (k={self.kernel_size}) -> {self.out_channels}"
