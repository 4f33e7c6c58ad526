"""Linear (affine / symmetric) quantization math on tensors only.

Shapes: a weight ``w`` of shape ``(out, ...)`` is viewed as ``(out, K)`` with
``K = prod(w.shape[1:])``. Granularity decides the shape of ``scale``/``zero_point``:

- tensor:  ``(1, 1)``
- channel: ``(out, 1)``            one scale per output channel
- group:   ``(out, K // g)``       one scale per ``g`` consecutive inputs of a channel
"""

from __future__ import annotations

import math

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


# -- observers: the clipping range of linear quantization -------------------------------------
#: clip ratios the ``mse`` observer tries, largest first (1.0 = min/max): 0.01 steps down to 0.2
MSE_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (0..1) along the last dimension, linear interpolation between order
    statistics (numpy's default ``method="linear"``); sorting keeps it free of
    ``torch.quantile``'s 16M-element limit. ``x`` (..., n) -> (...)."""
    s = torch.sort(x, dim=-1).values
    pos = q * (x.shape[-1] - 1)
    lo = int(pos)
    hi = min(lo + 1, x.shape[-1] - 1)
    return s[..., lo] + (s[..., hi] - s[..., lo]) * (pos - lo)


def _scale_floor(g: torch.Tensor, bits: int) -> float:
    """The smallest scale, relative to the tensor's range (see :func:`choose_qparams`)."""
    return max(float(g.abs().max()) * torch.finfo(torch.float32).eps / 2 ** bits, torch.finfo(torch.float32).tiny)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` mapping ``[lo, hi]`` (each group's clip range, any shape) onto the
    integer range of :func:`qrange` the way :func:`choose_qparams` maps min/max: symmetric uses
    ``max(|lo|, |hi|) / qmax``; affine stretches the range to hold 0 (zeros stay exact)."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(floor)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(floor)
    return scale, torch.round(qmin - lo / scale).clamp(qmin, qmax)


def choose_qparams_observed(w: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 128,
                            symmetric: bool = True, observer: str = "minmax",
                            percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the shapes of :func:`choose_qparams`, from the range an
    observer picks per scale group:

    - ``minmax``: the group's min and max (:func:`choose_qparams`);
    - ``percentile``: clipped at the ``percentile``-th percentile of ``|w|`` (symmetric) or at
      the ``100 - percentile`` / ``percentile`` percentiles of ``w`` (affine), :func:`quantile`;
    - ``mse``: min/max times the ratio of :data:`MSE_RATIOS` whose round trip
      (quantize, dequantize) has the least squared error in that group; the largest ratio wins
      a tie (Banner et al. 2019 and TensorRT's clip search minimise this error the same way).

    Raises ``ValueError`` for an unknown observer or a percentile outside (0, 100].
    """
    if observer == "minmax":
        return choose_qparams(w, bits, granularity, group_size, symmetric)
    g = _grouped(w.detach().float(), granularity, group_size)              # (R, G, k)
    floor = _scale_floor(g, bits)
    if observer == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if symmetric:
            hi = quantile(g.abs(), percentile / 100)
            return qparams_from_range(-hi, hi, bits, symmetric, floor)
        return qparams_from_range(quantile(g, 1 - percentile / 100), quantile(g, percentile / 100), bits,
                                  symmetric, floor)
    if observer != "mse":
        raise ValueError(f"observer must be minmax, percentile or mse, got {observer!r}")
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                                 # (R, G)
    best = best_err = None
    for ratio in MSE_RATIOS:
        scale, zero = qparams_from_range(lo * ratio, hi * ratio, bits, symmetric, floor)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
        err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - g).pow(2).sum(dim=-1)     # (R, G)
        if best is None:
            best, best_err = (scale, zero), err
            continue
        better = err < best_err
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
        best_err = torch.where(better, err, best_err)
    return best


# -- codebooks: weights as indices into a small table of levels ---------------------------
def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ascending ``levels`` (K,) for each element of ``x`` (any
    shape; int64, same shape). Exactly half-way goes to the lower level."""
    mid = (levels[1:] + levels[:-1]) / 2                                  # (K-1,) decision points
    return torch.bucketize(x, mid, right=False)


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the values ``x`` (n,) into ``k`` centroids, initialised linearly over
    ``[min, max]`` (Han et al. 2016, "Deep Compression", sec. 3.2: linear initialisation keeps
    the few large weights, which matter most, represented).

    Returns ``(centroids (k,) float32 ascending, assignment (n,) int64)``. Each iteration assigns
    every value to its nearest centroid (:func:`nearest_level`) and moves each centroid to the
    mean of its values; a centroid left without values stays where it is. Stops when no
    assignment changes or after ``iters`` iterations. In one dimension the clusters are
    intervals of the sorted values and the centroids stay sorted, so an iteration is a binary
    search of the K-1 decision points and prefix sums (O(K log n)), after one sort.
    """
    x = x.detach().reshape(-1).double()
    if x.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.int64)
    xs = torch.sort(x).values                                              # (n,)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), xs.cumsum(0)])   # (n+1,) prefix sums
    lo, hi = float(xs[0]), float(xs[-1])
    c = torch.linspace(lo, hi, k, dtype=torch.float64) if hi > lo else torch.full((k,), lo, dtype=torch.float64)
    edges = None
    for _ in range(iters):
        # the values of cluster i are xs[edges[i]:edges[i+1]]: at most the decision point after c[i]
        # (:func:`nearest_level` sends a value half-way to the lower centroid)
        new = torch.cat([torch.zeros(1, dtype=torch.int64),
                         torch.searchsorted(xs, (c[1:] + c[:-1]) / 2, right=True),
                         torch.tensor([xs.numel()])])
        if edges is not None and torch.equal(new, edges):
            break
        edges = new
        counts = edges[1:] - edges[:-1]
        c = torch.where(counts > 0, (csum[edges[1:]] - csum[edges[:-1]]) / counts.clamp_min(1), c)
    assign = nearest_level(x, c)
    return c.float(), assign


def log_levels(bits: int) -> torch.Tensor:
    """The magnitudes of ``log`` quantization, ascending: ``0`` and ``2**-(L-1) ... 2**-1, 1``
    with ``L = 2**(bits-1) - 1`` powers of two (one code for the sign; Miyashita et al. 2016,
    "Convolutional Neural Networks using Logarithmic Data Representation"). 2 bits: ``[0, 1]``;
    4 bits: ``[0, 1/64, ..., 1/2, 1]``."""
    n = 2 ** (bits - 1) - 1
    return torch.cat([torch.zeros(1), torch.pow(2.0, torch.arange(-(n - 1), 1, dtype=torch.float32))])


def quantize_log(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-of-two quantization with one scale per output channel: ``w ~ scale * sign * 2**e``.

    ``scale`` (out, 1) is each channel's max ``|w|``; a code ``c`` (int8, ``w``'s shape) is
    ``sign(w) * i`` with ``i`` the index of the nearest level of :func:`log_levels` to
    ``|w| / scale`` (0: the weight is zero). Nearest in value, not in log2: the error of a
    weight is at most half the gap between the two levels around it.
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)                      # (out, K)
    scale = w2.abs().amax(dim=1, keepdim=True)                          # (out, 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    idx = nearest_level(w2.abs() / safe, log_levels(bits))
    return (torch.sign(w2).to(torch.int64) * idx).to(torch.int8).reshape(w.shape), scale


def dequantize_log(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_log`: ``sign(c) * scale * log_levels(bits)[|c|]`` in float32."""
    c = codes.reshape(codes.shape[0], -1).to(torch.int64)
    w = torch.sign(c).float() * log_levels(bits).to(scale.device)[c.abs()] * scale
    return w.reshape(codes.shape)


def quantize_binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w ~ alpha * sign(w)`` (Rastegari et al. 2016, XNOR-Net eq. 2; Courbariaux et al. 2015,
    BinaryConnect): ``alpha`` (out, 1) the mean ``|w|`` of each output channel (the scale that
    minimises the squared error), codes uint8 (``w``'s shape), 1 for ``w >= 0`` and 0 below."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    alpha = w2.abs().mean(dim=1, keepdim=True)
    return (w2 >= 0).to(torch.uint8).reshape(w.shape), alpha


def dequantize_binary(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(2 * code - 1) * alpha`` in float32, ``codes``' shape."""
    c = codes.reshape(codes.shape[0], -1).float()
    return ((2 * c - 1) * alpha).reshape(codes.shape)


#: TWN's threshold factor: ``delta = 0.7 * mean |w|`` (Li & Liu 2016, eq. 9, the approximation
#: of the optimal threshold for uniform and normal weights)
TERNARY_DELTA = 0.7


def quantize_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights ``w ~ alpha * t``, ``t`` in {-1, 0, 1} (Li & Liu 2016, "Ternary Weight
    Networks", eq. 9-10), per output channel: ``delta = 0.7 * mean |w|``, ``t = sign(w)`` where
    ``|w| > delta`` else 0, ``alpha`` (out, 1) the mean ``|w|`` over ``|w| > delta`` (0 when no
    weight is above it). TWN takes one ``delta`` and ``alpha`` per layer; one per output channel
    is the same rule on each row. Codes int8, ``w``'s shape."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    delta = TERNARY_DELTA * w2.abs().mean(dim=1, keepdim=True)
    keep = w2.abs() > delta
    alpha = (w2.abs() * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    return (torch.sign(w2) * keep).to(torch.int8).reshape(w.shape), alpha


def dequantize_ternary(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``code * alpha`` in float32, ``codes``' shape."""
    return (codes.reshape(codes.shape[0], -1).float() * alpha).reshape(codes.shape)


#: the storage dtypes of ``float`` quantization
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}


def quantize_float(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w`` rounded to the narrow float ``dtype`` (round to nearest even). fp8 has a narrow
    range (e4m3: |x| <= 448, normals from 2**-6), so each output channel gets a scale (out, 1)
    mapping its max ``|w|`` to the largest finite fp8 value (the per-channel fp8 weight scaling
    of Micikevicius et al. 2022, "FP8 Formats for Deep Learning"); bf16/fp16 need none (None)."""
    w = w.detach().float()
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return w.to(dtype), None
    w2 = w.reshape(w.shape[0], -1)
    amax = w2.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    return (w2 / scale).to(dtype).reshape(w.shape), scale


def dequantize_float(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 weight from :func:`quantize_float`'s ``(stored, scale)``."""
    w = stored.float()
    return w if scale is None else (w.reshape(w.shape[0], -1) * scale).reshape(w.shape)


def smooth_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
    (Xiao et al., "SmoothQuant", ICML 2023, eq. 4): ``X / s`` and ``W * s`` leave ``X W^T``
    unchanged while moving range from the activations to the weights (``alpha`` 0..1: how much).

    ``act_max`` and ``weight_max`` are ``(in,)``: the largest ``|x_j|`` over the calibration
    tokens and the largest ``|w_ij|`` over the output rows of every layer reading ``x``. A channel
    whose activation or weight maximum is zero gets ``s_j = 1``; factors are clamped to
    ``[1e-5, 1e5]`` so that no folded weight underflows or overflows.

    Examples
    --------
    >>> smooth_scales(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0]), 0.5)
    tensor([2., 1.])
    """
    a, w = act_max.float(), weight_max.float()
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)


# -- activations (int8 execution: ``layers.int8.Int8Linear``) ---------------------------------

def token_absmax(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M, 1): each row's largest magnitude, floored at the smallest normal float so an
    all-zero row divides to zeros (its per-token scale; ZeroQuant, Yao et al. 2022, §3)."""
    return torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 affine ``(scale, zero_point)`` for activations observed in [lo, hi] (min/max
    observer): the range is widened to hold 0, ``scale = (hi - lo) / (2^bits - 1)``,
    ``zero_point = clamp(round(-lo / scale), 0, 2^bits - 1)`` (as float tensors)."""
    qmax = 2 ** bits - 1
    lo, hi = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0.0), torch.as_tensor(hi, dtype=torch.float32).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def activation_bits(weight_bits: int) -> int:
    """Activation bits that an x86 int8 kernel without VNNI multiplies exactly with
    ``weight_bits``-bit weight codes: AVX2's ``vpmaddubsw`` sums two uint8 x int8 products in a
    saturating int16, so ``2 (2^a - 1) 2^(w-1) <= 2^15 - 1`` must hold: 8-bit activations with
    weights of at most 7 bits, 7-bit activations (PyTorch's ``reduce_range``) with 8-bit weights."""
    return 8 if weight_bits <= 7 else 7


def int8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                          bias: torch.Tensor | None, static: tuple[torch.Tensor, torch.Tensor] | None = None,
                          act_bits: int = 8) -> torch.Tensor:
    """What an int8 x int8 linear computes, in float64 on integer-valued tensors (exact sums).

    ``x`` (*, K) float; ``codes`` (N, K) int8 weight codes with ``scale``/``zero`` of shape (N, 1)
    or (1, 1). Dynamic (``static`` None): per-token symmetric activations with ``L = 2^(act_bits-1) - 1``
    levels a side, ``q = round(L x / a)`` with ``a`` = :func:`token_absmax`,
    ``y = (q . (W - z)^T) a s_w / L + b``. Static (``static = (s_x, z_x)``, unsigned affine):
    ``q = clamp(round(x / s_x) + z_x, 0, 2^act_bits - 1)``, ``y = ((q - z_x) . (W - z)^T) s_x s_w + b``.
    Returns (*, N) float32.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).double()                                    # (M, K)
    w = codes.double() - (0.0 if zero is None else zero.double())             # (N, K)
    if static is None:
        a = token_absmax(x2)                                                  # (M, 1)
        levels = 2 ** (act_bits - 1) - 1
        q, rescale = torch.round(x2 / a * levels), a / levels
    else:
        s_x, z_x = (t.double() for t in static)
        q, rescale = torch.clamp(torch.round(x2 / s_x) + z_x, 0, 2 ** act_bits - 1) - z_x, s_x
    y = (q @ w.t()) * rescale * scale.double().reshape(1, -1)                 # (M, N)
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*shape[:-1], -1)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Static unsigned affine activation codes ``clamp(round(x / scale) + zero, 0, 2^bits - 1)``
    in ``x``'s shape, as float64 integer values (``scale``/``zero`` scalars from
    :func:`activation_qparams`)."""
    s, z = scale.double(), zero.double()
    return torch.clamp(torch.round(x.double() / s) + z, 0, 2 ** bits - 1)


def int8_conv2d_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          static: tuple[torch.Tensor, torch.Tensor], act_bits: int, stride: tuple[int, int],
                          padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """What an int8 x int8 convolution with static activations computes, in float64 on
    integer-valued tensors (exact sums).

    ``x`` (N, C_in, H, W) float; ``codes`` (C_out, C_in / groups, kH, kW) symmetric int8 weight
    codes with ``scale`` (C_out, 1) or (1, 1); ``static = (s_x, z_x)`` the unsigned affine input
    quantization (:func:`activation_qparams`), ``q = clamp(round(x / s_x) + z_x, 0, 2^act_bits - 1)``;
    ``y = conv(q - z_x, W) s_x s_w + b`` (Jacob et al., 2018, "Quantization and Training of Neural
    Networks for Efficient Integer-Arithmetic-Only Inference", eq. 7 with a float output).
    Returns (N, C_out, H_out, W_out) float32.
    """
    s_x, z_x = (t.double() for t in static)
    q = quantize_activation(x, s_x, z_x, act_bits) - z_x                            # (N, C_in, H, W)
    acc = torch.nn.functional.conv2d(q, codes.double(), None, stride, padding, dilation, groups)
    y = acc * s_x * scale.double().reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1, 1)
    return y.float()


# -- error measures (the report's per-layer table) ---------------------------------------------

def error_energy(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(sum reference^2, sum (reference - approx)^2)`` in float64: the signal and noise
    energies that :func:`sqnr_db` divides, summed over every element (any shapes that broadcast
    alike; sums of several batches add up before the ratio is taken).

    Examples
    --------
    >>> error_energy(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))
    (25.0, 1.0)
    """
    ref = reference.detach().double()
    return float(ref.square().sum()), float((ref - approx.detach().double()).square().sum())


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(signal / noise)``, from the energies
    of :func:`error_energy`: ``inf`` when the noise is 0 (exact), ``nan`` when the signal is 0 or
    either is not finite. 6.02 dB per bit for a full-scale uniform quantizer (Widrow & Kollar,
    "Quantization Noise", 2008, eq. 5.25); torchao's ``compute_error`` is the same ratio.

    Examples
    --------
    >>> round(sqnr_db(25.0, 1.0), 4), sqnr_db(1.0, 0.0)
    (13.9794, inf)
    """
    if not (math.isfinite(signal) and math.isfinite(noise)) or signal <= 0:
        return math.nan
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)
