"""Layers holding integer weights: ``QuantLinear`` and ``QuantConv2d``.

These live in the core (not in a method package) so that an artifact loads in a fresh process
without any method being imported first. Each declares its logical weights through
:meth:`slim_weights` (see :mod:`torchslim.layers`), so parameter and non-zero counts never guess
from dtypes or buffer names: a code equal to its zero point is a zero weight.

Weights are stored as int8 codes (``bits`` <= 8 used; the artifact packs sub-byte codes) plus
float32 scales (and zero points when affine); the forward
dequantizes and runs the float kernel, so the layer computes exactly what is stored and exports
to ONNX as plain ops. Under ``no_grad``/``inference_mode`` the dequantized weight is kept until
the codes or scales change (decompress once, like loading a compressed checkpoint), so
inference runs at float speed with float memory; with gradients on it is recomputed every call.
The kept weight is dropped by ``set_weight``, ``load_state_dict``, ``train()``/``eval()`` and
any in-place change of the buffers that bumps their version; writing through ``.data`` bypasses
version counting, so change codes through those methods.
Integer kernels plug in here later without changing the artifact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.quantize import primitives as P  # pure tensor math, no method registration
from ..modules import register_module_class


class _DequantizeLinear(torch.autograd.Function):
    """``(q - zero) * scale`` along ``axis`` that exports as ONNX ``DequantizeLinear``, so an
    ONNX file keeps the int8 codes instead of folding them into float constants."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * q.dim()
        if scale.dim():
            shape[axis] = -1
        return (q.float() - zero.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero, axis):  # ONNX graph construction
        return g.op("DequantizeLinear", q, scale, zero, axis_i=axis)


class _QuantWeight(nn.Module):
    def _init_q(self, weight_shape: tuple[int, ...], bits: int, granularity: str, group_size: int,
                symmetric: bool) -> None:
        self.bits, self.granularity, self.group_size, self.symmetric = bits, granularity, group_size, symmetric
        out = weight_shape[0]
        k = math.prod(weight_shape[1:])
        qshape = {"tensor": (1, 1), "channel": (out, 1), "group": (out, max(k // group_size, 1))}[granularity]
        self.register_buffer("weight_q", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(qshape))
        if not symmetric:
            self.register_buffer("zero_point", torch.zeros(qshape))
        else:
            self.zero_point = None

    def train(self, mode: bool = True) -> "_QuantWeight":
        self.__dict__.pop("_deq_cache", None)
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_deq_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    def set_weight(self, w: torch.Tensor) -> None:
        scale, zero = P.choose_qparams(w, self.bits, self.granularity, self.group_size, self.symmetric)
        self.weight_q.copy_(P.quantize(w, scale, zero, self.bits, self.granularity, self.group_size,
                                       self.symmetric))
        self.scale.copy_(scale)
        if self.zero_point is not None:
            self.zero_point.copy_(zero)
        self.__dict__.pop("_deq_cache", None)

    def _dequantize(self) -> torch.Tensor:
        zero = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
        return P.dequantize(self.weight_q, self.scale, zero, self.granularity, self.group_size)

    def _onnx_dequantize(self) -> torch.Tensor:
        """Per-tensor and per-channel codes as an ONNX DequantizeLinear node (int8 in the file);
        per-group needs opset 21 block quantization, so it is exported as float."""
        if self.granularity == "group":
            return self._dequantize()
        zero = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
        if self.granularity == "tensor":
            scale, zero = self.scale.reshape(()), zero.reshape(())
        else:
            scale, zero = self.scale.reshape(-1), zero.reshape(-1)
        return _DequantizeLinear.apply(self.weight_q, scale, zero.to(torch.int8), 0)

    def dequantized_weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._onnx_dequantize()
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self._dequantize()
        tensors = [t for t in (self.weight_q, self.scale, self.zero_point) if t is not None]
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        cache = self.__dict__.get("_deq_cache")
        if cache is None or cache[0] != key:
            cache = (key, self._dequantize())
            self.__dict__["_deq_cache"] = cache
        return cache[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a child's ``.weight`` (``nn.MultiheadAttention``
        reads ``out_proj.weight``). Assigning to it is an error: use :meth:`set_weight`."""
        return self.dequantized_weight()

    def slim_weights(self) -> dict[str, tuple[int, int]]:
        """Logical weights by the attribute holding them: ``{"weight_q": (numel, non-zeros),
        "bias": ...}``; a weight is zero where its code equals the zero point."""
        q = self.weight_q
        if self.zero_point is None:
            nonzero = int(torch.count_nonzero(q))
        else:
            g = P._grouped(q, self.granularity, self.group_size)            # (rows, groups, k)
            nonzero = int((g != self.zero_point.to(q.dtype).unsqueeze(-1)).sum())
        out = {"weight_q": (q.numel(), nonzero)}
        if self.bias is not None:
            out["bias"] = (self.bias.numel(), int(torch.count_nonzero(self.bias.detach())))
        return out

    def share_codes_with(self, other: "_QuantWeight") -> None:
        """Use ``other``'s code, scale and zero-point tensors (a weight tied in the float model
        stays one tensor once quantized: stored once, counted once)."""
        for name in ("weight_q", "scale", "zero_point"):
            if getattr(other, name) is not None:
                self._buffers[name] = other._buffers[name]
        self.__dict__.pop("_deq_cache", None)

    def _q_args(self) -> dict[str, Any]:
        return dict(bits=self.bits, granularity=self.granularity, group_size=self.group_size,
                    symmetric=self.symmetric)


@register_module_class(aliases=("torchslim.methods.quantize.modules.QuantLinear",))
class QuantLinear(_QuantWeight):
    """``nn.Linear`` with an int8-coded weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 granularity: str = "channel", group_size: int = 128, symmetric: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_q((out_features, in_features), bits, granularity, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, **qargs: Any) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, **qargs)
        q.set_weight(linear.weight.detach().cpu())
        if linear.bias is not None:  # keeps its dtype: an fp16 model stays fp16
            q.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=linear.bias.requires_grad)
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, **self._q_args())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, {self.granularity}"


@register_module_class(aliases=("torchslim.methods.quantize.modules.QuantConv2d",))
class QuantConv2d(_QuantWeight):
    """``nn.Conv2d`` with an int8-coded weight."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int = 1, bias: bool = True, *,
                 bits: int = 8, granularity: str = "channel", group_size: int = 128,
                 symmetric: bool = True) -> None:
        super().__init__()
        self.conv_args = dict(in_channels=in_channels, out_channels=out_channels,
                              kernel_size=list(kernel_size), stride=list(stride),
                              padding=padding if isinstance(padding, str) else list(padding),
                              dilation=list(dilation), groups=groups, bias=bias)
        shape = (out_channels, in_channels // groups, *kernel_size)
        self._init_q(shape, bits, granularity, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **qargs: Any) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports padding_mode='zeros' only")
        q = cls(conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride),
                conv.padding if isinstance(conv.padding, str) else list(conv.padding), list(conv.dilation),
                conv.groups, conv.bias is not None, **qargs)
        q.set_weight(conv.weight.detach().cpu())
        if conv.bias is not None:
            q.bias = nn.Parameter(conv.bias.detach().cpu().clone(), requires_grad=conv.bias.requires_grad)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.dequantized_weight().to(x.dtype), bias, tuple(a["stride"]), padding,
                        tuple(a["dilation"]), a["groups"])

    def rebuild_args(self) -> dict[str, Any]:
        return dict(**self.conv_args, **self._q_args())

    def extra_repr(self) -> str:
        a = self.conv_args
        return f"{a['in_channels']}, {a['out_channels']}, k={a['kernel_size']}, bits={self.bits}, {self.granularity}"
