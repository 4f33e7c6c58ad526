"""Linear (affine / symmetric) quantization math on tensors only.

Shapes: a weight ``w`` of shape ``(out, ...)`` is viewed as ``(out, K)`` with
``K = prod(w.shape[1:])``. Granularity decides the shape of ``scale``/``zero_point``:

- tensor:  ``(1, 1)``
- channel: ``(out, 1)``            one scale per output channel
- group:   ``(out, K // g)``       one scale per ``g`` consecutive inputs of a channel
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric uses [-(2^(b-1) - 1), 2^(b-1) - 1] so that zero is exact and
    the range is balanced; affine uses the full [-2^(b-1), 2^(b-1) - 1]."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    w2 = w.reshape(w.shape[0], -1)                                  # (out, K)
    if granularity == "tensor":
        return w2.reshape(1, 1, -1)                                 # (1, 1, out*K)
    if granularity == "channel":
        return w2.unsqueeze(1)                                      # (out, 1, K)
    if w2.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {w2.shape[1]} inputs per channel")
    return w2.reshape(w2.shape[0], -1, group_size)                  # (out, K/g, g)


def choose_qparams(w: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 128,
                   symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max ``(scale, zero_point)`` of shapes described in the module docstring."""
    g = _grouped(w.detach().float(), granularity, group_size)
    qmin, qmax = qrange(bits, symmetric)
    # the floor on a scale is relative to the tensor's range: a channel of tiny weights (all
    # below 1e-5, say) keeps a scale fitted to them, where an absolute floor (float32 eps) would
    # round it coarsely; only an all-zero tensor falls back to the smallest normal float
    eps = max(float(g.abs().max()) * torch.finfo(torch.float32).eps / 2 ** bits, torch.finfo(torch.float32).tiny)
    if symmetric:
        amax = g.abs().amax(dim=-1)
        scale = (amax / qmax).clamp_min(eps)
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=-1).clamp(max=0.0)     # the range always holds 0 so zeros stay exact
        hi = g.amax(dim=-1).clamp(min=0.0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, granularity: str,
             group_size: int, symmetric: bool) -> torch.Tensor:
    """``q = clamp(round(w / scale) + zero, qmin, qmax)`` as int8, in ``w``'s shape."""
    qmin, qmax = qrange(bits, symmetric)
    g = _grouped(w.detach().float(), granularity, group_size)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
    return q.to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, granularity: str,
               group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w = (q - zero) * scale`` in ``q``'s shape."""
    g = _grouped(q.to(torch.float32), granularity, group_size)
    w = (g - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)
