"""``Int4Linear``: a 4-bit group-quantized linear layer run on PyTorch's CPU int4 kernel for
small inputs, on its dequantized weight for large ones.

``QuantLinear`` stores the codes and computes in float on the dequantized weight (float speed,
float memory traffic). ``Int4Linear`` keeps the same codes, scales and artifact tensors and, for
calls of at most ``max_rows`` input rows, multiplies bfloat16 activations by the codes unpacked
on the fly by ``aten._weight_int4pack_mm_for_cpu`` (the A16W4 "tinygemm" kernel torchao's CPU
int4 weight-only path calls), whose packed weight is 8x smaller than float32. The kernel reads

    w = (u - 8) * s + z_k,     u in [0, 15] packed two per byte, (s, z_k) per group of inputs

so a stored code ``q`` (symmetric in [-7, 7], affine in [-8, 7] with zero point ``z``:
``w = (q - z) * s``) maps to ``u = q + 8`` and ``z_k = -z * s`` (0 when symmetric). Scales enter
the kernel as bfloat16, the activations too; the output is cast back to the input's dtype.

Measured (BENCHMARKS.md, "Weight-only int4"): per layer with the weight hot in cache the kernel
is slower than float32, but over a whole model at batch 1 (weights streamed from memory) it ran
all-MiniLM-L6-v2 in 0.41-0.57x of fp32's time, and 1.7-2.6x slower at batch 32. Hence the
choice by rows: ``max_rows`` is set by ``quantize.linear``'s ``kernel: auto`` from whole-model
timings and kept in the artifact (a rebuild argument), so a reload runs the same choice.

``kernel``:

- ``"int4pack"``: the int4 kernel for inputs of at most ``max_rows`` rows on CPU under
  ``no_grad``/``inference_mode``; otherwise (more rows, another device, gradients on, ONNX
  export) exactly ``QuantLinear``'s float computation on the cached dequantized weight;
- ``"dequant"``: always ``QuantLinear``'s computation.

The kernel's constraints (this torch): ``group_size`` in {32, 64, 128, 256}, ``in_features``
divisible by ``group_size``, ``out_features`` divisible by 16.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modules import register_module_class
from .quantized import QuantLinear, float_compute, float_only  # noqa: F401  (float_compute re-exported)

KERNELS = ("int4pack", "dequant")
#: group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts
GROUP_SIZES = (32, 64, 128, 256)
#: ``out_features`` must be a multiple of this (``aten._convert_weight_to_int4pack_for_cpu``)
OUT_MULTIPLE = 16


def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only kernels."""
    return all(hasattr(torch.ops.aten, op) for op in ("_convert_weight_to_int4pack_for_cpu",
                                                      "_weight_int4pack_mm_for_cpu"))


def int4_refusal(in_features: int, out_features: int, bits: int, granularity: str, group_size: int) -> str | None:
    """Why a linear layer of this shape and quantization cannot run the int4 kernel, or None."""
    if bits != 4 or granularity != "group":
        return f"the int4 kernel needs bits 4 and granularity group, not bits {bits}, granularity {granularity}"
    if group_size not in GROUP_SIZES:
        return f"the int4 kernel takes group_size {' / '.join(map(str, GROUP_SIZES))}, not {group_size}"
    if in_features % group_size:
        return f"group_size {group_size} does not divide its {in_features} inputs"
    if out_features % OUT_MULTIPLE:
        return f"its {out_features} outputs are not a multiple of {OUT_MULTIPLE} (the kernel's packing)"
    return None


@register_module_class
class Int4Linear(QuantLinear):
    """``nn.Linear`` with 4-bit group codes: input (*, in_features) float -> output
    (*, out_features) in the input's dtype.

    Parameters
    ----------
    kernel : {"int4pack", "dequant"}, default="int4pack"
        What the forward pass runs (module docstring).
    max_rows : int or None, default=None
        ``int4pack`` runs the kernel for inputs of at most this many rows (all dims but the
        last multiplied); None: any number of rows; 0: never.

    Other parameters are those of :class:`~torchslim.layers.QuantLinear`; ``bits`` must be 4 and
    ``granularity`` ``group`` (symmetric or affine).

    Raises
    ------
    ValueError
        Other bits or granularity, a group size or shape the kernel does not take
        (:func:`int4_refusal`), an unknown ``kernel``, a negative ``max_rows``.

    Examples
    --------
    >>> import torch
    >>> layer = Int4Linear.from_float(torch.nn.Linear(64, 32), bits=4, granularity="group",
    ...                               group_size=32, max_rows=8).eval()
    >>> with torch.inference_mode():
    ...     layer(torch.randn(3, 64)).shape, layer.runs_on(torch.randn(3, 64))
    (torch.Size([3, 32]), 'int4pack')
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 granularity: str = "group", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32", kernel: str = "int4pack", max_rows: int | None = None) -> None:
        why = int4_refusal(in_features, out_features, bits, granularity, group_size)
        if why:
            raise ValueError(f"Int4Linear({in_features}, {out_features}): {why}")
        if kernel not in KERNELS:
            raise ValueError(f"Int4Linear: kernel must be one of {KERNELS}, not {kernel!r}")
        if max_rows is not None and int(max_rows) < 0:
            raise ValueError(f"Int4Linear: max_rows must be >= 0, not {max_rows}")
        super().__init__(in_features, out_features, bias, bits=bits, granularity=granularity,
                         group_size=group_size, symmetric=symmetric, dtype=dtype)
        self.kernel, self.max_rows = kernel, None if max_rows is None else int(max_rows)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, *, kernel: str = "int4pack", max_rows: int | None = None,
                   **qargs: Any) -> "Int4Linear":
        """Quantize ``linear``'s weight (``qargs`` as :meth:`QuantLinear.from_float`)."""
        return super().from_float(linear, kernel=kernel, max_rows=max_rows, **qargs)

    # -- the int4 kernel ---------------------------------------------------------------------
    def _packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed (N, K/2) uint8, scales_and_zeros (K/g, N, 2) bf16)`` built from the codes
        (kept until codes or scales change; never stored)."""
        codes, scale, zero = self._q_tensors("weight")
        key = tuple((t.data_ptr(), t._version) for t in (codes, scale, zero) if t is not None)
        cache = self.__dict__.get("_packed_cache")
        if cache is None or cache[0] != key:
            u = (codes.to(torch.int32) + 8).contiguous()                        # (N, K) in [0, 15]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            shift = torch.zeros_like(scale) if zero is None else -zero * scale   # (N, K/g)
            sz = torch.stack([scale.t(), shift.t()], -1).to(torch.bfloat16).contiguous()
            cache = self.__dict__["_packed_cache"] = (key, (packed, sz))
        return cache[1]

    def runs_on(self, x: torch.Tensor) -> str:
        """The kernel the forward pass uses for input ``x``: ``int4pack`` when ``kernel`` is
        ``int4pack``, ``x`` has at most ``max_rows`` rows, is a float tensor on CPU and
        gradients are off, outside :func:`float_compute` and ONNX export; else ``dequant``."""
        if self.kernel != "int4pack" or float_only():   # before any look at x: no guard on its shape in tracing
            return "dequant"
        few = self.max_rows is None or x.shape[:-1].numel() <= self.max_rows
        if (few and x.device.type == "cpu" and x.is_floating_point()
                and (torch.is_inference_mode_enabled() or not torch.is_grad_enabled())):
            return "int4pack"
        return "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_on(x) == "dequant":
            return super().forward(x)
        packed, sz = self._packed()
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()       # (M, K): the kernel reads A densely
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz).to(x.dtype)   # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def train(self, mode: bool = True) -> "Int4Linear":
        self.__dict__.pop("_packed_cache", None)
        return super().train(mode)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(**super().rebuild_args(), kernel=self.kernel, max_rows=self.max_rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}, max_rows={self.max_rows}"
