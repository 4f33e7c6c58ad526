"""GPTQ on tensors only: one layer's weight rounded column by column with Hessian error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023. For a linear layer ``y = W x`` with calibration inputs
``X`` (columns are examples), the layer-wise objective ``||W X - Q X||^2`` has the Hessian
``H = 2 X X^T`` (in x in, eq. 1). Columns are rounded one at a time; the rounding error of
column ``q`` is spread over the columns not yet rounded by the Optimal Brain Surgeon update
(eq. 2-3), which GPTQ computes from the upper Cholesky factor of ``H^-1`` (sec. 3, "Step 3")
and applies lazily, ``block_size`` columns at a time ("Step 2").

Shapes: ``w`` is ``(out, in)``, ``h`` is ``(in, in)``; codes, scales and zero points come back in
the layout of :mod:`.primitives` (``scale``: ``(1, 1)`` tensor, ``(out, 1)`` channel,
``(out, in // group_size)`` group), so :meth:`QuantLinear.set_codes` stores them as they are.
"""

from __future__ import annotations

import torch

from . import primitives as P


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X X^T / n`` of inputs ``x`` of shape ``(n, in)`` (rows are examples; any leading
    batch dimensions flattened before): ``(in, in)`` float32. The mean over examples keeps
    the damping (relative to the mean diagonal) independent of ``n``."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, granularity: str = "channel",
                  group_size: int = 128, symmetric: bool = True, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (out, in) against Hessian ``h`` (in, in): ``(codes, scale, zero)``.

    Parameters
    ----------
    w : Tensor (out, in)
        The float weight.
    h : Tensor (in, in)
        ``2 X X^T / n`` of the layer's calibration inputs (:func:`hessian`), symmetric PSD.
    bits, granularity, group_size, symmetric
        As :func:`.primitives.choose_qparams`. Scales of a channel or tensor come from the whole
        original weight; a group's from its columns as updated when the group's first column is
        reached (the reference implementation's order), or, with ``act_order``, from the
        original weight ("static groups", so a group stays contiguous in storage).
    block_size : int, default=128
        Columns per lazy batch update: speed only, the result is the same up to float rounding.
    damp : float, default=0.01
        ``damp * mean(diag(H))`` added to the diagonal before inverting (sec. 4, "dampening").
    act_order : bool, default=False
        Round columns by decreasing ``diag(H)`` (the reference's "act-order" heuristic).

    Returns
    -------
    codes : int8 Tensor (out, in); scale, zero : float32 Tensors in :mod:`.primitives`' layout.

    Raises
    ------
    ValueError
        When shapes disagree, or ``group_size`` does not divide ``in``.

    Notes
    -----
    Weights that are exactly zero (pruned) get the zero point's code, so they stay zero; their
    compensation updates go to the other weights of their row. Inputs that never fire (``H[j, j] == 0``) get ``H[j, j] = 1``: their column is rounded to
    nearest and passes no error on. With ``h`` the identity (uncorrelated inputs of equal
    power) GPTQ is exactly round-to-nearest: ``H^-1`` has no off-diagonal terms to spread the
    error with.

    Examples
    --------
    >>> w = torch.randn(4, 8); x = torch.randn(64, 8)
    >>> codes, scale, zero = gptq_quantize(w, hessian(x), bits=4)
    >>> codes.shape, scale.shape
    (torch.Size([4, 8]), torch.Size([4, 1]))
    """
    out, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian of shape {tuple(h.shape)} for a weight of {cols} input columns")
    if granularity == "group" and cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {cols} inputs per channel")
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    qmin, qmax = P.qrange(bits, symmetric)

    # scales: tensor/channel from the whole weight; groups as they are reached (see docstring)
    gran = "tensor" if granularity == "tensor" else "channel"
    n_groups = cols // group_size if granularity == "group" else 1
    scale = torch.empty(out, n_groups, device=w.device) if granularity == "group" else None
    zero = torch.empty(out, n_groups, device=w.device) if granularity == "group" else None
    if granularity != "group":
        scale, zero = P.choose_qparams(w, bits, gran, symmetric=symmetric)
    elif act_order:
        for g in range(n_groups):
            s, z = P.choose_qparams(w[:, g * group_size:(g + 1) * group_size], bits, "channel", symmetric=symmetric)
            scale[:, g:g + 1], zero[:, g:g + 1] = s, z

    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
            else torch.arange(cols, device=w.device))
    w, h = w[:, perm], h[perm][:, perm]
    pruned = w == 0                                     # (out, in) zeros stay zero: sparsity survives
    h_inv = _inverse_cholesky(h, damp)                  # upper U with U^T U = H^-1, (in, in)
    codes = torch.empty(out, cols, device=w.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()                        # (out, B) this block's columns, updated in place
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if granularity != "group":
                s, z = scale.expand(out, 1)[:, 0], zero.expand(out, 1)[:, 0]
            else:
                g = int(perm[j]) // group_size
                if not act_order and j % group_size == 0:   # a group's first column: fit the group now
                    # on its columns' current values: this block's updated copy, then the later
                    # blocks' columns with this block's errors so far applied (as the lazy update will)
                    rest = w[:, i2:j + group_size] - err1 @ h_inv[i1:i2, i2:j + group_size]
                    cur = torch.cat([w1[:, i:i + group_size], rest], dim=1)
                    scale[:, g:g + 1], zero[:, g:g + 1] = P.choose_qparams(cur, bits, "channel",
                                                                           symmetric=symmetric)
                s, z = scale[:, g], zero[:, g]
            col = w1[:, i]
            q = torch.where(pruned[:, j], z, torch.clamp(torch.round(col / s) + z, qmin, qmax))
            codes[:, j] = q
            e = (col - (q - z) * s) / hinv1[i, i]        # rounding error over [H^-1]_qq (eq. 3)
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)   # OBS update inside the block
            err1[:, i] = e
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]            # lazy update of every later column

    codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale, zero


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; when the damped ``H`` is
    still not positive definite (float rounding on a rank-deficient ``H``), the damping is
    raised tenfold, up to three times, before giving up with a ValueError."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(torch.diag(h).mean())
    for k in range(4):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10 ** k) * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("GPTQ: the layer's input Hessian is not positive definite even with 1000x the damping; "
                     "its calibration inputs are degenerate (all zero or non-finite?)")
