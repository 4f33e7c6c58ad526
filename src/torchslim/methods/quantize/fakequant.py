"""Fake quantization for quantization-aware training: tensor math only.

Each function maps a float weight to the float value its integer codes stand for, with a
gradient that training can follow:

- straight-through estimator (STE; Bengio, Leonard & Courville 2013, "Estimating or propagating
  gradients through stochastic neurons"): rounding and sign pass the incoming gradient through
  unchanged (``f(x).detach() + (x - x.detach())``);
- learned step size (LSQ; Esser et al. 2020, "Learned Step Size Quantization", eqs. 1-5): the
  scale is a trainable tensor, ``w_hat = round(clamp(w / s, qmin - z, qmax - z)) * s``; inside the
  range d w_hat / d w = 1 and d w_hat / d s = round(w/s) - w/s, outside d w_hat / d w = 0 and
  d w_hat / d s = qmin or qmax (minus z); the gradient of ``s`` is scaled by
  ``g = 1 / sqrt(N * Qp)``, ``N`` the weights sharing the scale and ``Qp`` = qmax;
- binary weights (BinaryConnect / BWN, Rastegari et al. 2016 eq. 4): ``alpha * sign(w)`` with
  ``alpha = mean |w|`` per output channel;
- ternary weights (TWN, Li, Zhang & Liu 2016, eqs. 7 and 9): threshold ``delta = 0.7 * mean |w|``
  per output channel, ``alpha`` = mean of ``|w|`` above it, ``alpha * sign(w) * [|w| > delta]``.

Shapes follow :mod:`.primitives`: ``w`` of shape ``(out, ...)``, scales of shape ``(R, G)``
(``(1, 1)`` per tensor, ``(out, 1)`` per channel, ``(out, K // g)`` per group), ``w`` read as
``(R, G, -1)``. Binary and ternary codes are per channel: codes in {-1, 1} / {-1, 0, 1} of ``w``'s
shape (int8) and ``alpha`` of shape ``(out, 1)``, i.e. a 2-bit symmetric per-channel layer of
:mod:`torchslim.layers.quantized` holds them exactly.
"""

from __future__ import annotations

import math

import torch

#: TWN's threshold factor: delta = 0.7 * mean |w| approximates the optimal threshold for
#: Gaussian / uniform weights (Li et al. 2016, eq. 9)
TWN_DELTA = 0.7


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (exactly: the added term is 0), identity backward."""
    return torch.round(x).detach() + (x - x.detach())


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward (exactly), gradient multiplied by ``g`` backward (LSQ's gradient scale)."""
    return x.detach() + (x * g - (x * g).detach())


def lsq_grad_factor(per_scale: int, qmax: int) -> float:
    """LSQ's ``g = 1 / sqrt(N * Qp)``: ``N`` weights share each scale, ``Qp`` = qmax."""
    return 1.0 / math.sqrt(per_scale * qmax)


def lsq_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      qmin: int, qmax: int) -> torch.Tensor:
    """LSQ fake quantization of ``w`` (any shape ``(out, ...)``) with trainable ``scale`` (R, G)
    and a fixed integer ``zero`` (R, G) or None (symmetric); returns ``w``'s shape and dtype.

    The forward value equals :func:`.primitives.dequantize` of :func:`.primitives.quantize` at
    that scale. Scales are floored at a tiny positive value so a
    step driven below zero cannot flip signs.

    Examples
    --------
    >>> w = torch.tensor([[0.26, -1.0, 0.9]], requires_grad=True)
    >>> s = torch.tensor([[0.25]], requires_grad=True)
    >>> out = lsq_fake_quantize(w, s, None, -3, 3)
    >>> out.detach().tolist()
    [[0.25, -0.75, 0.75]]
    >>> out.sum().backward()
    >>> w.grad.tolist()                       # clipped weights get no gradient
    [[1.0, 0.0, 0.0]]
    """
    rows, groups = scale.shape
    wg = w.float().reshape(rows, groups, -1)                                   # (R, G, k)
    s = scale_grad(scale, lsq_grad_factor(wg.shape[-1], qmax)).clamp_min(torch.finfo(torch.float32).tiny)
    s = s.unsqueeze(-1)                                                        # (R, G, 1)
    z = 0.0 if zero is None else zero.detach().unsqueeze(-1)
    # clip before rounding (LSQ eq. 1), so a weight beyond the range gets no gradient and its
    # scale the bound; rounding an integer-bounded clip equals clipping the rounded value, so the
    # forward is exactly round-then-clamp
    q = round_ste(torch.clamp(wg / s, qmin - z, qmax - z))                      # q - z
    return (q * s).reshape(w.shape).to(w.dtype)


def lsq_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int,
              qmax: int) -> torch.Tensor:
    """The int8 codes :func:`lsq_fake_quantize` stands for, in ``w``'s shape."""
    rows, groups = scale.shape
    wg = w.detach().float().reshape(rows, groups, -1)
    z = 0.0 if zero is None else zero.unsqueeze(-1)
    s = scale.detach().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return torch.clamp(torch.round(wg / s) + z, qmin, qmax).to(torch.int8).reshape(w.shape)


def binary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)``: codes ``sign(w)`` in {-1, 1} (zero maps to +1) as int8 of ``w``'s
    shape, ``alpha = mean |w|`` per output channel, shape ``(out, 1)``.

    Examples
    --------
    >>> codes, alpha = binary_codes(torch.tensor([[0.5, -1.5, 0.0, 2.0]]))
    >>> codes.tolist(), alpha.tolist()
    ([[1, -1, 1, 1]], [[1.0]])
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)                           # (out, K)
    codes = torch.where(w2 >= 0, 1, -1).to(torch.int8)
    return codes.reshape(w.shape), w2.abs().mean(dim=1, keepdim=True)


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)`` of TWN: codes in {-1, 0, 1} (zero where ``|w| <= 0.7 mean |w|`` of the
    channel) as int8 of ``w``'s shape; ``alpha`` (out, 1) the mean ``|w|`` of the kept weights
    (0 for a channel of zeros).

    Examples
    --------
    >>> codes, alpha = ternary_codes(torch.tensor([[0.1, -1.5, 0.2, 2.5]]))   # delta = 0.7 * 1.075
    >>> codes.tolist(), alpha.tolist()
    ([[0, -1, 0, 1]], [[2.0]])
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)                           # (out, K)
    a = w2.abs()
    keep = a > TWN_DELTA * a.mean(dim=1, keepdim=True)
    alpha = (a * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    codes = (torch.sign(w2) * keep).to(torch.int8)
    return codes.reshape(w.shape), alpha


def binary_fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """``alpha * sign(w)`` per output channel forward, identity gradient to ``w`` (STE)."""
    codes, alpha = binary_codes(w)
    wb = (codes.reshape(w.shape[0], -1).float() * alpha).reshape(w.shape).to(w.dtype)
    return wb + (w - w.detach())


def ternary_fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """TWN's ``alpha * sign(w) * [|w| > delta]`` per output channel forward, identity gradient to
    ``w`` (STE)."""
    codes, alpha = ternary_codes(w)
    wt = (codes.reshape(w.shape[0], -1).float() * alpha).reshape(w.shape).to(w.dtype)
    return wt + (w - w.detach())
