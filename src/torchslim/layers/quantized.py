"""Layers holding integer weights: ``QuantLinear``, ``QuantConv1d/2d/3d``, ``QuantEmbedding`` and
``QuantMultiheadAttention``.

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

import contextlib
import copy
import math
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.quantize import primitives as P  # pure tensor math, no method registration
from ..modules import register_module_class

_FLOAT_ONLY = threading.local()


@contextlib.contextmanager
def float_compute() -> Iterator[None]:
    """Inside the block every layer with integer kernels (``Int8Linear``, ``Int8Conv2d``,
    ``Int4Linear``) computes on its dequantized weight in float, as its ONNX export does: used
    around the export (the file holds the weight codes, not the kernels) and around the
    reference an exported file is checked against."""
    before = getattr(_FLOAT_ONLY, "on", False)
    _FLOAT_ONLY.on = True
    try:
        yield
    finally:
        _FLOAT_ONLY.on = before


def float_only() -> bool:
    """Whether :func:`float_compute` or an ONNX export is in progress (integer kernels off)."""
    return getattr(_FLOAT_ONLY, "on", False) or torch.onnx.is_in_onnx_export()


@torch.library.custom_op("torchslim::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``w = (q - zero) * scale`` as float32 in ``q``'s shape, as one graph op for export.

    ``scale`` (and ``zero``, None when symmetric) has shape ``(R, G)``: ``(1, 1)`` per tensor,
    ``(out, 1)`` per channel, ``(out, K // g)`` per group; ``q`` is read as ``(R, G, -1)``, which
    is :func:`~torchslim.methods.quantize.primitives.dequantize`'s grouping for all three. As a
    custom op it stays one node while ``torch.export`` traces the layer, so the ONNX exporter
    writes the int8 codes and the scales as initializers (:mod:`torchslim.onnx_io` translates it
    to Cast/Reshape/Sub/Mul on them) instead of a float weight computed at trace time.
    """
    g = q.float().reshape(scale.shape[0], scale.shape[1], -1)          # (R, G, k)
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    return (g * scale.unsqueeze(-1)).reshape(q.shape)


@dequantize_weight.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _QuantWeights(nn.Module):
    """One or more weights held as integer codes (buffers) with float scales and, when affine,
    zero points. ``self._qweights`` maps each weight's name to its ``(codes, scale, zero point)``
    buffer names; the weights themselves are read (dequantized) through
    :meth:`dequantized_weight`."""

    def _init_q(self, weight_shape: tuple[int, ...], bits: int, granularity: str, group_size: int,
                symmetric: bool, dtype: str = "float32", name: str = "weight",
                buffers: tuple[str, str, str] = ("weight_q", "scale", "zero_point")) -> None:
        self.bits, self.granularity, self.group_size, self.symmetric = bits, granularity, group_size, symmetric
        self.float_dtype = getattr(torch, dtype)   # the dtype the weight had in float (fp16 models)
        self.__dict__.setdefault("_qweights", {})[name] = buffers
        codes, scale, zero = buffers
        out = weight_shape[0]
        k = math.prod(weight_shape[1:])
        qshape = {"tensor": (1, 1), "channel": (out, 1), "group": (out, max(k // group_size, 1))}[granularity]
        self.register_buffer(codes, torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer(scale, torch.ones(qshape))
        if not symmetric:
            self.register_buffer(zero, torch.zeros(qshape))
        else:
            setattr(self, zero, None)

    def train(self, mode: bool = True) -> "_QuantWeights":
        self.__dict__.pop("_deq_cache", None)
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_deq_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    def _q_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        codes, scale, zero = self._qweights[name]
        return self._buffers[codes], self._buffers[scale], getattr(self, zero)

    def set_weight(self, w: torch.Tensor, name: str = "weight",
                   qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantize float weight ``w`` (the shape of the codes) into the codes of ``name``, with
        ``qparams`` ``(scale, zero_point)`` when given (an observer's), else min/max ones."""
        codes, scale, zero = self._q_tensors(name)
        s, z = qparams or P.choose_qparams(w, self.bits, self.granularity, self.group_size, self.symmetric)
        codes.copy_(P.quantize(w, s, z, self.bits, self.granularity, self.group_size, self.symmetric))
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)
        self.__dict__.pop("_deq_cache", None)

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                  name: str = "weight") -> None:
        """Store given integer ``codes`` (the weight's shape) and ``scale`` (zero point ``zero``
        when affine) as weight ``name``, as found by a method of its own (QAT's learned step
        sizes) rather than by min/max. ValueError when a shape or the code range does not fit."""
        own_codes, own_scale, own_zero = self._q_tensors(name)
        qmin, qmax = P.qrange(self.bits, self.symmetric)
        if codes.shape != own_codes.shape or scale.shape != own_scale.shape:
            raise ValueError(f"set_codes: codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit "
                             f"{tuple(own_codes.shape)} / {tuple(own_scale.shape)}")
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"set_codes: codes outside [{qmin}, {qmax}] of {self.bits}-bit "
                             f"{'symmetric' if self.symmetric else 'affine'} quantization")
        if (zero is None) != (own_zero is None):
            raise ValueError("set_codes: give a zero point exactly when the layer is affine")
        own_codes.copy_(codes)
        own_scale.copy_(scale)
        if own_zero is not None:
            own_zero.copy_(zero)
        self.__dict__.pop("_deq_cache", None)

    def _dequantize(self, name: str = "weight") -> torch.Tensor:
        codes, scale, zero = self._q_tensors(name)
        zero = zero if zero is not None else torch.zeros_like(scale)
        return P.dequantize(codes, scale, zero, self.granularity, self.group_size)

    def _onnx_dequantize(self, name: str = "weight") -> torch.Tensor:
        """The weight as one :func:`dequantize_weight` node on the codes and scales, so the ONNX
        file keeps the integer codes (every granularity); ONNX Runtime folds the node into a float
        weight once, when the session is created."""
        codes, scale, zero = self._q_tensors(name)
        return dequantize_weight(codes, scale, zero)

    def dequantized_weight(self, name: str = "weight") -> torch.Tensor:
        """Weight ``name`` as float32 (kept for inference until its codes or scales change)."""
        if torch.onnx.is_in_onnx_export():
            return self._onnx_dequantize(name)
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self._dequantize(name)
        tensors = [t for t in self._q_tensors(name) if t is not None]
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        caches = self.__dict__.setdefault("_deq_cache", {})
        cache = caches.get(name)
        if cache is None or cache[0] != key:
            cache = caches[name] = (key, self._dequantize(name))
        return cache[1]

    def slim_weights(self) -> dict[str, tuple[int, int]]:
        """Logical weights by the attribute holding them: ``{"weight_q": (numel, non-zeros),
        "bias": ...}`` (every code buffer, then the module's own float parameters); a weight is
        zero where its code equals the zero point."""
        out = {}
        for name, (codes_name, _, _) in self._qweights.items():
            q, _, zero = self._q_tensors(name)
            if zero is None:
                nonzero = int(torch.count_nonzero(q))
            else:
                g = P._grouped(q, self.granularity, self.group_size)            # (rows, groups, k)
                nonzero = int((g != zero.to(q.dtype).unsqueeze(-1)).sum())
            out[codes_name] = (q.numel(), nonzero)
        for name, p in self.named_parameters(recurse=False):
            out[name] = (p.numel(), int(torch.count_nonzero(p.detach())))
        return out

    def share_codes_with(self, other: "_QuantWeights") -> None:
        """Use ``other``'s code, scale and zero-point tensors (a weight tied in the float model
        stays one tensor once quantized: stored once, counted once)."""
        for buffers in self._qweights.values():
            for name in buffers:
                if getattr(other, name) is not None:
                    self._buffers[name] = other._buffers[name]
        self.__dict__.pop("_deq_cache", None)

    def _q_args(self) -> dict[str, Any]:
        args = dict(bits=self.bits, granularity=self.granularity, group_size=self.group_size,
                    symmetric=self.symmetric)
        if self.float_dtype != torch.float32:  # float32 layers keep the records they always had
            args["dtype"] = _dtype_name(self.float_dtype)
        return args


class _QuantWeight(_QuantWeights):
    """A layer with one quantized ``weight``, readable as ``.weight``."""

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's float dtype, for code that reads a child's
        ``.weight`` (``nn.MultiheadAttention`` reads ``out_proj.weight``). Assigning to it is an
        error: use :meth:`set_weight`."""
        return self.dequantized_weight().to(self.float_dtype)


def _float_args(weight: torch.Tensor, qargs: dict[str, Any]) -> dict[str, Any]:
    return {**qargs, "dtype": _dtype_name(weight.dtype)}


def _copy_param(p: nn.Parameter | None) -> nn.Parameter | None:
    """A CPU copy of a float parameter, keeping its dtype (an fp16 model stays fp16)."""
    return None if p is None else nn.Parameter(p.detach().cpu().clone(), requires_grad=p.requires_grad)


@register_module_class(aliases=("torchslim.methods.quantize.modules.QuantLinear",))
class QuantLinear(_QuantWeight):
    """``nn.Linear`` with an int8-coded weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 granularity: str = "channel", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_q((out_features, in_features), bits, granularity, group_size, symmetric, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, **qargs: Any) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                **_float_args(linear.weight, qargs))
        q.set_weight(linear.weight.detach().cpu())
        q.bias = _copy_param(linear.bias)
        return q.to(linear.weight.device).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, **self._q_args())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, {self.granularity}"


def conv_args(in_channels: int, out_channels: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
              groups: int, bias: bool) -> dict[str, Any]:
    """A convolution's rebuild arguments as JSON-ready values (lists; ``padding`` may be a string)."""
    return dict(in_channels=in_channels, out_channels=out_channels, kernel_size=list(kernel_size),
                stride=list(stride), padding=padding if isinstance(padding, str) else list(padding),
                dilation=list(dilation), groups=groups, bias=bias)


def float_conv_args(conv: nn.modules.conv._ConvNd, what: str) -> tuple:
    """The positional constructor arguments of a quantized convolution copying ``conv``;
    ValueError unless ``conv`` pads with zeros (``what``: the quantized class, for the message)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"{what} supports padding_mode='zeros' only")
    return tuple(conv_args(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.bias is not None).values())


class _QuantConv(_QuantWeight):
    """``nn.ConvNd`` (padding mode ``zeros``) with an int8-coded weight; subclasses name the
    functional convolution."""

    _conv: Any = None  # F.conv1d / F.conv2d / F.conv3d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int = 1, bias: bool = True, *,
                 bits: int = 8, granularity: str = "channel", group_size: int = 128,
                 symmetric: bool = True, dtype: str = "float32") -> None:
        super().__init__()
        self.conv_args = conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        shape = (out_channels, in_channels // groups, *kernel_size)
        self._init_q(shape, bits, granularity, group_size, symmetric, dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, **qargs: Any) -> "_QuantConv":
        q = cls(*float_conv_args(conv, cls.__name__), **_float_args(conv.weight, qargs))
        q.set_weight(conv.weight.detach().cpu())
        q.bias = _copy_param(conv.bias)
        return q.to(conv.weight.device).train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return type(self)._conv(x, self.dequantized_weight().to(x.dtype), bias, tuple(a["stride"]), padding,
                                tuple(a["dilation"]), a["groups"])

    def rebuild_args(self) -> dict[str, Any]:
        return dict(**self.conv_args, **self._q_args())

    def extra_repr(self) -> str:
        a = self.conv_args
        return f"{a['in_channels']}, {a['out_channels']}, k={a['kernel_size']}, bits={self.bits}, {self.granularity}"


@register_module_class
class QuantConv1d(_QuantConv):
    """``nn.Conv1d`` with an int8-coded weight: input (N, C_in, L) -> (N, C_out, L_out)."""

    _conv = staticmethod(F.conv1d)


@register_module_class(aliases=("torchslim.methods.quantize.modules.QuantConv2d",))
class QuantConv2d(_QuantConv):
    """``nn.Conv2d`` with an int8-coded weight: input (N, C_in, H, W) -> (N, C_out, H_out, W_out)."""

    _conv = staticmethod(F.conv2d)


@register_module_class
class QuantConv3d(_QuantConv):
    """``nn.Conv3d`` with an int8-coded weight: input (N, C_in, D, H, W) -> (N, C_out, D', H', W')."""

    _conv = staticmethod(F.conv3d)


@register_module_class
class QuantEmbedding(_QuantWeight):
    """``nn.Embedding`` with an int8-coded table: ids (*) -> vectors (*, embedding_dim) in the
    table's float dtype. ``channel`` granularity is one scale per row (per token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 bits: int = 8, granularity: str = "channel", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_q((num_embeddings, embedding_dim), bits, granularity, group_size, symmetric, dtype)

    @classmethod
    def from_float(cls, emb: nn.Embedding, **qargs: Any) -> "QuantEmbedding":
        if emb.max_norm is not None:
            raise ValueError("QuantEmbedding does not renormalize rows: max_norm must be None")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, **_float_args(emb.weight, qargs))
        q.set_weight(emb.weight.detach().cpu())
        return q.to(emb.weight.device).train(emb.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized_weight().to(self.float_dtype), self.padding_idx)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
                    padding_idx=self.padding_idx, **self._q_args())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, {self.granularity}"


def _packed(name: str) -> property:
    def get(self: "QuantMultiheadAttention") -> torch.Tensor | None:
        if name in self.__dict__.get("_qweights", {}):
            return self.dequantized_weight(name).to(self.float_dtype)
        if name in self._parameters:  # while nn.MultiheadAttention builds, and the unused ones (None)
            return self._parameters[name]
        raise AttributeError(name)
    return property(get, doc=f"``{name}`` dequantized, in the layer's float dtype (read-only).")


@register_module_class
class QuantMultiheadAttention(_QuantWeights, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input projection is int8-coded: the packed
    ``in_proj_weight`` (3 * embed_dim, embed_dim), or ``q/k/v_proj_weight`` when ``kdim``/``vdim``
    differ from ``embed_dim``. Those attributes read back as dequantized float tensors, so
    ``nn.MultiheadAttention.forward`` (and ``nn.TransformerEncoderLayer``'s fused path, which reads
    them) runs unchanged; biases stay float, and ``out_proj`` is an ordinary child module (a
    ``QuantLinear`` when targeted). Shapes are those of ``nn.MultiheadAttention``.
    """

    in_proj_weight = _packed("in_proj_weight")
    q_proj_weight = _packed("q_proj_weight")
    k_proj_weight = _packed("k_proj_weight")
    v_proj_weight = _packed("v_proj_weight")

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, bits: int = 8,
                 granularity: str = "channel", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)
        names = ["in_proj_weight"] if self._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight",
                                                                     "v_proj_weight"]
        for name in names:
            w = self._parameters.pop(name)       # the float weight becomes int8 codes
            prefix = name.removesuffix("_weight")
            self._init_q(tuple(w.shape), bits, granularity, group_size, symmetric, dtype, name=name,
                         buffers=(f"{name}_q", f"{prefix}_scale", f"{prefix}_zero_point"))

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, **qargs: Any) -> "QuantMultiheadAttention":
        first = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        q = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, **_float_args(first, qargs))
        for name in q._qweights:
            q.set_weight(getattr(mha, name).detach().cpu(), name)
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            setattr(q, name, _copy_param(getattr(mha, name)))
        if type(mha.out_proj) is type(q.out_proj):
            q.out_proj.load_state_dict(mha.out_proj.state_dict())
            q.out_proj.to(mha.out_proj.weight.dtype)
        else:  # already replaced (a QuantLinear): kept as it is
            q.out_proj = copy.deepcopy(mha.out_proj)
        return q.to(first.device).train(mha.training)  # dropout follows the float layer's mode

    def rebuild_args(self) -> dict[str, Any]:
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, dropout=self.dropout,
                    bias=self.in_proj_bias is not None, add_bias_kv=self.bias_k is not None,
                    add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
                    batch_first=self.batch_first, **self._q_args())

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, heads={self.num_heads}, bits={self.bits}, {self.granularity}"
