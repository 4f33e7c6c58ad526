"""Layers whose weight is stored in a compact code other than affine integers: ``CodedLinear``,
``CodedConv1d/2d/3d`` and ``CodedEmbedding``.

One ``scheme`` per layer says what the codes (the buffer ``weight_q``, the weight's shape) mean:

=========  ============================  ===========================================================
scheme     ``weight_q``                  weight
=========  ============================  ===========================================================
kmeans     uint8 index, ``bits`` bits    ``codebook[index]`` (a trainable parameter of K entries);
                                         with ``zero_code``, index 0 is an exact zero (pruned
                                         weights stay zero) and ``codebook[index - 1]`` the others
log        int8 ``sign * level``         ``sign * scale[row] * 2**(level - L)``, 0 for level 0
binary     uint8 0 / 1                   ``(2 * code - 1) * scale[row]``
ternary    int8 -1 / 0 / 1               ``code * scale[row]``
float      bf16, fp16, fp8 e4m3 / e5m2   ``code * scale[row]`` (fp8), the value itself (bf16, fp16)
=========  ============================  ===========================================================

The math is :mod:`torchslim.methods.quantize.primitives`; the artifact stores ``weight_q`` as
it is (sub-byte codes bit-packed or sparse- or entropy-coded by :mod:`torchslim.encodings`), so
the file holds the codes, not float weights. The forward decodes the weight and runs the float
kernel in the input's dtype (fp8 is upcast); under ``no_grad``/``inference_mode`` the decoded
weight is kept until a code, scale or centroid changes, as in :mod:`torchslim.layers.quantized`.
With gradients on, a k-means layer's centroids are trained: the gradient of a centroid is the
sum of the gradients of the weights that share it (Han et al. 2016, "Deep Compression", eq. 3),
while its indices stay fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.quantize import primitives as P  # pure tensor math, no method registration
from ..modules import register_module_class
from .quantized import _copy_param, _dtype_name, _QuantConv, conv_args, float_conv_args

#: scheme -> allowed ``bits`` (``float`` takes its width from ``storage``)
SCHEME_BITS = {"kmeans": tuple(range(2, 9)), "log": tuple(range(2, 9)), "binary": (1,), "ternary": (2,),
               "float": (8, 16)}
#: the storage dtypes of the ``float`` scheme, by name
FLOAT_STORAGE = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


class _CodedWeight(nn.Module):
    """A layer whose ``weight`` is decoded from ``weight_q`` (+ ``scale`` per output row, or a
    ``codebook``); see the module docstring for the schemes."""

    def _init_coded(self, shape: tuple[int, ...], scheme: str, bits: int, dtype: str, storage: str | None,
                    codebook_size: int, zero_code: bool) -> None:
        if scheme not in SCHEME_BITS or bits not in SCHEME_BITS[scheme]:
            raise ValueError(f"{type(self).__name__}: scheme {scheme!r} with {bits} bits is not defined "
                             f"(schemes and bits: {SCHEME_BITS})")
        self.scheme, self.bits, self.zero_code, self.storage = scheme, bits, zero_code, storage
        self.float_dtype = getattr(torch, dtype)         # the dtype the weight had in float (fp16 models)
        if scheme == "float":
            if storage not in FLOAT_STORAGE:
                raise ValueError(f"float storage must be one of {FLOAT_STORAGE}, got {storage!r}")
            code_dtype = getattr(torch, storage)
        else:
            code_dtype = torch.uint8 if scheme in ("kmeans", "binary") else torch.int8
        self.register_buffer("weight_q", torch.zeros(shape, dtype=code_dtype))
        if scheme == "kmeans":
            self.codebook = nn.Parameter(torch.zeros(codebook_size))    # (K,) centroids
            self.scale = None
        elif scheme != "float" or storage.startswith("float8"):
            self.register_buffer("scale", torch.ones(shape[0], 1))       # (out, 1)
        else:
            self.scale = None

    # -- decoding ---------------------------------------------------------------------------
    def _table(self) -> torch.Tensor:
        """The k-means levels by index: the centroids, after a fixed 0 with ``zero_code``."""
        if self.zero_code:
            return torch.cat([self.codebook.new_zeros(1), self.codebook])
        return self.codebook

    def _dequantize(self) -> torch.Tensor:
        """The weight in float32, the shape of ``weight_q``."""
        q = self.weight_q
        if self.scheme == "kmeans":
            return self._table().float()[q.long()]
        if self.scheme == "log":
            return P.dequantize_log(q, self.scale, self.bits)
        if self.scheme == "binary":
            return P.dequantize_binary(q, self.scale)
        if self.scheme == "ternary":
            return P.dequantize_ternary(q, self.scale)
        return P.dequantize_float(q, self.scale)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight_q, self.scale, getattr(self, "codebook", None)) if t is not None]

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in float32 (kept for inference until its codes, scales or centroids change;
        recomputed, and differentiable in the centroids, while gradients are on)."""
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self._dequantize()
        key = tuple((t.data_ptr(), t._version, t.device) for t in self._state_tensors())
        cache = self.__dict__.get("_deq_cache")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_deq_cache"] = (key, self._dequantize())
        return cache[1]

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight in the layer's float dtype, for code that reads ``.weight``
        (``nn.MultiheadAttention`` reads ``out_proj.weight``). Read-only: use :meth:`set_weight`."""
        return self.dequantized_weight().to(self.float_dtype)

    def train(self, mode: bool = True) -> "_CodedWeight":
        self.__dict__.pop("_deq_cache", None)
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_deq_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    # -- encoding ---------------------------------------------------------------------------
    def set_weight(self, w: torch.Tensor) -> None:
        """Encode float weight ``w`` (``weight_q``'s shape) with the layer's scheme: k-means
        clusters the weights (the non-zero ones with ``zero_code``) into ``codebook`` from a
        linear initialisation (:func:`~torchslim.methods.quantize.primitives.kmeans_1d`)."""
        w = w.detach().float().cpu()
        if w.shape != self.weight_q.shape:
            raise ValueError(f"weight of shape {tuple(w.shape)} for codes of shape {tuple(self.weight_q.shape)}")
        with torch.no_grad():
            if self.scheme == "kmeans":
                flat = w.reshape(-1)
                kept = flat != 0 if self.zero_code else torch.ones_like(flat, dtype=torch.bool)
                centroids, assign = P.kmeans_1d(flat[kept], self.codebook.numel())
                codes = torch.zeros(flat.shape, dtype=torch.int64)
                codes[kept] = assign + int(self.zero_code)
                self.weight_q.copy_(codes.reshape(w.shape))
                self.codebook.copy_(centroids)
                return self.__dict__.pop("_deq_cache", None)
            if self.scheme == "log":
                codes, scale = P.quantize_log(w, self.bits)
            elif self.scheme == "binary":
                codes, scale = P.quantize_binary(w)
            elif self.scheme == "ternary":
                codes, scale = P.quantize_ternary(w)
            else:
                codes, scale = P.quantize_float(w, self.weight_q.dtype)
            self.weight_q.copy_(codes)
            if scale is not None:
                self.scale.copy_(scale)
        self.__dict__.pop("_deq_cache", None)

    def slim_weights(self) -> dict[str, tuple[int, int]]:
        """``{"weight_q": (numel, non-zeros of the decoded weight), "bias": ...}``: the codes
        count as the weights they encode; scales and centroids are not weights (as the scales
        of :mod:`torchslim.layers.quantized`)."""
        with torch.no_grad():
            out = {"weight_q": (self.weight_q.numel(), int(torch.count_nonzero(self.dequantized_weight())))}
        for name, p in self.named_parameters(recurse=False):
            if name != "codebook":
                out[name] = (p.numel(), int(torch.count_nonzero(p.detach())))
        return out

    def share_codes_with(self, other: "_CodedWeight") -> None:
        """Use ``other``'s codes, scales and centroids (a weight tied in the float model stays one
        tensor once coded: stored once, counted once, its centroids trained once)."""
        self._buffers["weight_q"] = other._buffers["weight_q"]
        if other.scale is not None:
            self._buffers["scale"] = other._buffers["scale"]
        if self.scheme == "kmeans":
            self.codebook = other.codebook
        self.__dict__.pop("_deq_cache", None)

    def _coded_args(self) -> dict[str, Any]:
        return dict(scheme=self.scheme, bits=self.bits, dtype=_dtype_name(self.float_dtype), storage=self.storage,
                    codebook_size=self.codebook.numel() if self.scheme == "kmeans" else 0,
                    zero_code=self.zero_code)

    def _coded_repr(self) -> str:
        what = self.storage if self.scheme == "float" else f"bits={self.bits}"
        return f"{self.scheme}, {what}"


def coded_args(weight: torch.Tensor, scheme: str, bits: int, storage: str | None = None) -> dict[str, Any]:
    """The constructor's coding arguments for float ``weight``: its dtype, and for k-means the
    codebook size (``2**bits``, or ``2**bits - 1`` beside the zero code when ``weight`` has exact
    zeros, i.e. was pruned)."""
    zero = scheme == "kmeans" and bool((weight.detach() == 0).any())
    return dict(scheme=scheme, bits=bits, dtype=_dtype_name(weight.dtype), storage=storage,
                codebook_size=2 ** bits - int(zero) if scheme == "kmeans" else 0, zero_code=zero)


_CODED_DEFAULTS = dict(scheme="kmeans", bits=8, dtype="float32", storage=None, codebook_size=256, zero_code=False)


@register_module_class
class CodedLinear(_CodedWeight):
    """``nn.Linear`` with a coded weight: input (*, in_features) -> (*, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **coding: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_coded((out_features, in_features), **{**_CODED_DEFAULTS, **coding})
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str, bits: int, storage: str | None = None) -> "CodedLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                **coded_args(linear.weight, scheme, bits, storage))
        q.set_weight(linear.weight)
        q.bias = _copy_param(linear.bias)
        return q.to(linear.weight.device).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    **self._coded_args())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._coded_repr()}"


class _CodedConv(_CodedWeight):
    """``nn.ConvNd`` (padding mode ``zeros``) with a coded weight; subclasses name the functional
    convolution."""

    _conv: Any = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int = 1, bias: bool = True,
                 **coding: Any) -> None:
        super().__init__()
        self.conv_args = conv_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        shape = (out_channels, in_channels // groups, *kernel_size)
        self._init_coded(shape, **{**_CODED_DEFAULTS, **coding})
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, scheme: str, bits: int,
                   storage: str | None = None) -> "_CodedConv":
        q = cls(*float_conv_args(conv, cls.__name__), **coded_args(conv.weight, scheme, bits, storage))
        q.set_weight(conv.weight)
        q.bias = _copy_param(conv.bias)
        return q.to(conv.weight.device).train(conv.training)

    forward = _QuantConv.forward    # the functional convolution on ``dequantized_weight()``

    def rebuild_args(self) -> dict[str, Any]:
        return dict(**self.conv_args, **self._coded_args())

    def extra_repr(self) -> str:
        a = self.conv_args
        return f"{a['in_channels']}, {a['out_channels']}, k={a['kernel_size']}, {self._coded_repr()}"


@register_module_class
class CodedConv1d(_CodedConv):
    """``nn.Conv1d`` with a coded weight: input (N, C_in, L) -> (N, C_out, L_out)."""

    _conv = staticmethod(F.conv1d)


@register_module_class
class CodedConv2d(_CodedConv):
    """``nn.Conv2d`` with a coded weight: input (N, C_in, H, W) -> (N, C_out, H_out, W_out)."""

    _conv = staticmethod(F.conv2d)


@register_module_class
class CodedConv3d(_CodedConv):
    """``nn.Conv3d`` with a coded weight: input (N, C_in, D, H, W) -> (N, C_out, D', H', W')."""

    _conv = staticmethod(F.conv3d)


@register_module_class
class CodedEmbedding(_CodedWeight):
    """``nn.Embedding`` with a coded table: ids (*) -> vectors (*, embedding_dim) in the table's
    float dtype; scales are per row (per token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 **coding: Any) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_coded((num_embeddings, embedding_dim), **{**_CODED_DEFAULTS, **coding})

    @classmethod
    def from_float(cls, emb: nn.Embedding, scheme: str, bits: int, storage: str | None = None) -> "CodedEmbedding":
        if emb.max_norm is not None:
            raise ValueError("CodedEmbedding does not renormalize rows: max_norm must be None")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, **coded_args(emb.weight, scheme, bits, storage))
        q.set_weight(emb.weight)
        return q.to(emb.weight.device).train(emb.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized_weight().to(self.float_dtype), self.padding_idx)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
                    padding_idx=self.padding_idx, **self._coded_args())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._coded_repr()}"
