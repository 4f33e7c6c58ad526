"""Folding math on tensors only: a BatchNorm into the layer before it, two Linears into one.

All arithmetic is done in float64 and returned in the dtype of the incoming weight, so a folded
fp16 layer rounds once.
"""

from __future__ import annotations

import torch


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   eps: float, gamma: torch.Tensor | None = None,
                   beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a layer followed by an eval-mode BatchNorm, as one layer.

    ``BN(W x + b) = gamma (W x + b - mean) / sqrt(var + eps) + beta = W' x + b'`` with
    ``W' = W * s`` (row-wise) and ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``
    (Ioffe & Szegedy 2015, eq. in Alg. 2, step 11; Jacob et al. 2018, sec. 3.2).

    Parameters
    ----------
    weight : (C_out, ...) a Linear's [out, in] or a convolution's [out, in/groups, *kernel]
    bias : (C_out,) or None (a layer without bias counts as zeros)
    mean, var : (C_out,) the BatchNorm's running statistics
    eps : the BatchNorm's epsilon
    gamma, beta : (C_out,) or None (``affine=False``: ones and zeros)

    Returns
    -------
    (weight, bias) of shapes ``weight.shape`` and ``(C_out,)``, in ``weight``'s dtype.
    """
    w = weight.detach().double()
    scale = torch.rsqrt(var.detach().double() + eps)                              # (C_out,)
    if gamma is not None:
        scale = scale * gamma.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros_like(scale)
    new_b = (b - mean.detach().double()) * scale
    if beta is not None:
        new_b = new_b + beta.detach().double()
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fuse_linear(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Linear computing ``L2(L1(x))``: ``W = W2 W1`` ([out2, in1]) and ``b = W2 b1 + b2``
    ((out2,), None when neither layer has a bias).

    ``w1``: [hidden, in1], ``w2``: [out2, hidden]. Float64 inside, ``w1``'s dtype out.
    """
    a, c = w1.detach().double(), w2.detach().double()
    w = c @ a                                                                    # [out2, in1]
    if b1 is None and b2 is None:
        return w.to(w1.dtype), None
    b = torch.zeros(c.shape[0], dtype=torch.float64, device=c.device)
    if b1 is not None:
        b = b + c @ b1.detach().double()
    if b2 is not None:
        b = b + b2.detach().double()
    return w.to(w1.dtype), b.to(w1.dtype)
