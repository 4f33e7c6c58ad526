"""Pruning math on tensors only: scores in, masks out. No modules, no I/O."""

from __future__ import annotations

import math

import torch


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask removing exactly ``round(sparsity * n)`` lowest-scoring elements.

    Ties are broken by position (a stable sort), so the count is exact even when many scores
    are equal (for example weights already pruned to zero).

    Examples
    --------
    >>> topk_mask(torch.tensor([3.0, -1.0, 0.5, 2.0]).abs(), 0.5)
    tensor([ True, False, False,  True])
    """
    n = scores.numel()
    k = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores.reshape(-1).float(), stable=True).indices
        keep[order[:k]] = False
    return keep.reshape(scores.shape)


def global_masks(scores: list[torch.Tensor], sparsity: float,
                 max_layer_sparsity: float = 1.0, caps: list[int] | None = None) -> list[torch.Tensor]:
    """Keep-masks for several tensors with one threshold across all of them (global scope).

    ``max_layer_sparsity`` caps the fraction removed from any one tensor: a tensor the global
    threshold would strip further keeps its highest-scoring ``1 - max_layer_sparsity``, and the
    removals it is spared fall on the others, so exactly ``round(sparsity * total)`` elements go.
    Raises ValueError when the cap makes that impossible.

    Examples
    --------
    >>> a, b = torch.arange(1.0, 5.0), torch.arange(10.0, 14.0)
    >>> [m.tolist() for m in global_masks([a, b], 0.5)]
    [[False, False, False, False], [True, True, True, True]]
    >>> [m.tolist() for m in global_masks([a, b], 0.5, max_layer_sparsity=0.75)]
    [[False, False, False, True], [False, True, True, True]]
    """
    sizes = [s.numel() for s in scores]
    k_total = int(round(sparsity * sum(sizes)))
    if caps is None:
        caps = [int(max_layer_sparsity * n) for n in sizes]      # most removable per tensor
    if sum(caps) < k_total:
        raise ValueError(f"max_layer_sparsity {max_layer_sparsity} leaves at most {sum(caps)} of "
                         f"{sum(sizes)} weights removable, fewer than sparsity {sparsity} needs ({k_total})")
    capped: dict[int, torch.Tensor] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in capped]
        k = k_total - sum(caps[i] for i in capped)
        flat = torch.cat([scores[i].reshape(-1).float() for i in free]) if free else torch.empty(0)
        keep = topk_mask(flat, k / max(flat.numel(), 1)) if free else flat.bool()
        out, start, over = {}, 0, []
        for i in free:
            m = keep[start:start + sizes[i]].reshape(scores[i].shape)
            start += sizes[i]
            out[i] = m
            if int((~m).sum()) > caps[i]:
                over.append(i)
        if not over:
            break
        for i in over:  # these tensors lose exactly their cap, by their own ranking
            capped[i] = topk_mask(scores[i], caps[i] / sizes[i])
    out.update(capped)
    return [out[i] for i in range(len(scores))]


def layer_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks with the same sparsity in every tensor (per-layer scope)."""
    return [topk_mask(s, sparsity) for s in scores]


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule: s_t = s_f + (s_i - s_f) * (1 - t / total)^3.

    Examples
    --------
    >>> cubic_sparsity(0, 10, 0.9), cubic_sparsity(10, 10, 0.9), round(cubic_sparsity(5, 10, 0.8), 3)
    (0.0, 0.9, 0.7)
    """
    if total <= 0:
        return final
    t = min(max(step / total, 0.0), 1.0)
    return final + (initial - final) * (1.0 - t) ** 3


def units_kept(sparsity: float, units: int) -> int:
    """Units left when ``sparsity`` of ``units`` go: ``floor((1 - sparsity) * units)``, so at
    least the asked fraction is removed (``ceil(sparsity * units)`` go, up to float error, which
    a 1e-9 margin absorbs). Torch-Pruning's rule (``int(n * (1 - ratio))`` kept), so both tools
    give the same widths; may be 0 (the caller keeps a floor).

    Examples
    --------
    >>> units_kept(0.3, 64), units_kept(0.5, 64), units_kept(0.3, 10), units_kept(0.29, 100)
    (44, 32, 7, 71)
    """
    return max(int(math.floor((1.0 - sparsity) * units + 1e-9)), 0)


def round_kept(kept: int, units: int, per_unit: int = 1, round_to: int = 1) -> int:
    """The number of units to keep (of ``units``, each ``per_unit`` channels wide) nearest to
    ``kept`` whose channel count ``kept * per_unit`` is a multiple of ``round_to``, at least one
    unit; ``kept`` itself (at least 1) when no such count exists. Ties go to the larger count.

    Examples
    --------
    >>> round_kept(13, 64, round_to=8), round_kept(3, 64, round_to=8), round_kept(5, 6, round_to=8)
    (16, 8, 5)
    >>> round_kept(5, 32, per_unit=2, round_to=8)   # 5 units = 10 channels -> 4 units = 8 channels
    4
    """
    kept = min(max(kept, 1), units)
    if round_to <= 1:
        return kept
    fits = [k for k in range(1, units + 1) if (k * per_unit) % round_to == 0]
    if not fits:
        return kept
    return min(fits, key=lambda k: (abs(k - kept), -k))


def interpolate_curve(points: list[tuple[float, float]], sparsity: float) -> float:
    """Metric at ``sparsity`` read off a sensitivity curve ``[(sparsity, metric), ...]`` by
    linear interpolation (the end values held outside the measured range).

    Examples
    --------
    >>> interpolate_curve([(0.0, 1.0), (0.5, 0.8), (1.0, 0.2)], 0.25)
    0.9
    """
    pts = sorted(points)
    if sparsity <= pts[0][0]:
        return pts[0][1]
    for (s0, m0), (s1, m1) in zip(pts, pts[1:]):
        if sparsity <= s1:
            return m0 + (m1 - m0) * (sparsity - s0) / (s1 - s0) if s1 > s0 else m1
    return pts[-1][1]


ALLOCATIONS = ("equal_drop", "knapsack")


def allocate_ratios(curves: dict[str, list[tuple[float, float]]],
                    costs: dict[str, float | list[tuple[float, float]]], baseline: float,
                    budget: float, max_sparsity: float = 0.95, tol: float = 1e-6,
                    total: float | None = None, allocation: str = "equal_drop") -> dict[str, float]:
    """Per-layer sparsities that remove ``budget`` (a fraction of ``total``, by default the summed
    linear ``costs``) at the least predicted metric loss, from per-layer sensitivity curves.

    ``allocation="equal_drop"``: each layer gets the largest sparsity whose interpolated metric
    stays within ``t`` of ``baseline`` (capped at ``max_sparsity``), with the tolerance ``t`` found
    by bisection as the smallest one meeting the budget: insensitive layers are pruned hard,
    sensitive ones lightly, whatever each cut removes (the per-layer thresholding of Han et al.
    2015, sec. 4, and Distiller's sensitivity analysis).

    ``allocation="knapsack"``: the sparsities minimizing the summed predicted drops
    ``sum_l drop_l(s_l)`` subject to ``sum_l cost_l(s_l) >= budget * total``, a multiple-choice
    knapsack over a grid of sparsities (the budgeted pruning of Aflalo et al. 2020, "Knapsack
    Pruning with Inner Distillation", and Shen et al. 2022, HALP, eq. 3), solved by Lagrangian
    relaxation (Everett 1963): for a price ``lam`` each layer takes the sparsity maximizing
    ``lam * cost_l(s) - drop_l(s)``, and ``lam`` is bisected to the smallest price meeting the
    budget. A layer whose cut removes much (early, high-resolution convs for MACs) is cut harder
    than one as sensitive that removes little. ``drop_l`` is the running maximum of ``baseline -
    metric`` along the curve (a dip that recovers is not trusted).

    A layer's cost is a number (what its sparsity removes in proportion: its parameters or MACs)
    or a measured curve ``[(sparsity, cost removed), ...]`` (channel pruning also shrinks the
    layers that read the channels, so what goes is measured, not proportional). Higher metric =
    better. Raises ValueError when even ``max_sparsity`` everywhere cannot meet the budget, or for
    an unknown ``allocation``.

    Examples
    --------
    >>> curves = {"a": [(0.0, 1.0), (0.9, 0.99)], "b": [(0.0, 1.0), (0.9, 0.5)]}
    >>> r = allocate_ratios(curves, {"a": 100, "b": 100}, baseline=1.0, budget=0.5, max_sparsity=0.9)
    >>> r["a"] > r["b"], round(r["a"] * 100 + r["b"] * 100) >= 100
    (True, True)

    Two layers as sensitive, one removing 10x the cost per unit of sparsity: the knapsack cuts it
    alone, equal_drop cuts both alike.

    >>> curves = {"big": [(0.0, 1.0), (0.9, 0.9)], "small": [(0.0, 1.0), (0.9, 0.9)]}
    >>> allocate_ratios(curves, {"big": 1000, "small": 100}, 1.0, 0.5, max_sparsity=0.9, allocation="knapsack")
    {'big': 0.55, 'small': 0.0}
    >>> {k: round(v, 2) for k, v in allocate_ratios(curves, {"big": 1000, "small": 100}, 1.0, 0.5,
    ...                                              max_sparsity=0.9).items()}
    {'big': 0.5, 'small': 0.5}
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    def cost_at(name: str, s: float) -> float:
        c = costs[name]
        return s * float(c) if isinstance(c, (int, float)) else interpolate_curve([(0.0, 0.0), *c], s)

    if total is None:
        total = sum(float(costs[n]) for n in curves if isinstance(costs[n], (int, float)))
    if total <= 0:
        raise ValueError("the layers given have no cost to remove")
    grid = [i / 1000 * max_sparsity for i in range(1001)]

    def ratios_for(t: float) -> dict[str, float]:
        out = {}
        for name, pts in curves.items():
            # a curve may dip and recover: take the longest prefix within tolerance
            best = 0.0
            for s in grid:
                if baseline - interpolate_curve(pts, s) <= t:
                    best = s
                else:
                    break
            out[name] = best
        return out

    def removed(r: dict[str, float]) -> float:
        return sum(cost_at(n, r[n]) for n in curves) / total

    if removed({n: max_sparsity for n in curves}) + tol < budget:
        raise ValueError(f"cannot remove {budget:.0%}: pruning every layer to {max_sparsity:.0%} removes "
                         f"{removed({n: max_sparsity for n in curves}):.1%}")
    if allocation == "knapsack":
        r = _knapsack(curves, cost_at, total, baseline, budget, grid, tol)
        order: list[str] = []            # meets the budget to within one grid step: nothing to trim
    else:
        hi = max(abs(baseline - m) for pts in curves.values() for _, m in pts) + 1.0
        r = ratios_for(_smallest(lambda t: removed(ratios_for(t)) + tol >= budget, 0.0, hi, 60))
        order = sorted(curves, key=lambda n: -r[n])
    # the tolerance grid overshoots: trim the least sensitive layers' excess back to the budget
    for name in order:
        if removed(r) <= budget + tol:
            break
        keep, low = r[name], 0.0
        r[name] = 0.0
        if removed(r) >= budget:
            continue                     # the others meet the budget without this layer
        hi_s = keep                      # smallest sparsity of this layer that still meets it
        for _ in range(40):
            mid = (low + hi_s) / 2
            r[name] = mid
            if removed(r) >= budget:
                hi_s = mid
            else:
                low = mid
        r[name] = hi_s
    return {n: round(v, 6) for n, v in r.items()}


def _smallest(meets, lo: float, hi: float, iterations: int) -> float:
    """Bisection: the smallest value in ``[lo, hi]`` for which the monotone ``meets`` holds, to
    within ``(hi - lo) / 2**iterations`` (``hi`` when nothing smaller does)."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _knapsack(curves: dict[str, list[tuple[float, float]]], cost_at, total: float, baseline: float,
              budget: float, grid: list[float], tol: float) -> dict[str, float]:
    """The Lagrangian solution of :func:`allocate_ratios`' knapsack on ``grid``: the smallest price
    of removed cost whose per-layer choices remove at least ``budget`` of ``total``, the layers
    whose choice jumps at that price moved only as far as the budget needs (to one grid step)."""
    import numpy as np
    names = list(curves)
    s = np.asarray(grid)
    drops, gains = [], []
    for n in names:
        d = np.asarray([baseline - interpolate_curve(curves[n], v) for v in grid], dtype=float)
        d = np.maximum.accumulate(np.nan_to_num(d, nan=np.inf, posinf=np.inf))   # -inf metric: never taken
        drops.append(np.maximum(d, 0.0))
        gains.append(np.asarray([cost_at(n, v) for v in grid], dtype=float) / total)
    drops_a, gains_a = np.vstack(drops), np.vstack(gains)

    def pick(lam: float) -> np.ndarray:
        # the first (smallest-sparsity) maximizer of lam * gain - drop in every row
        return np.argmax(np.where(np.isfinite(drops_a), lam * gains_a - drops_a, -np.inf), axis=1)

    def removed(idx: np.ndarray) -> float:
        return float(gains_a[np.arange(len(names)), idx].sum())

    def meets(lam: float) -> bool:
        return removed(pick(lam)) + tol >= budget

    lo, hi = 0.0, 1.0
    while not meets(hi) and hi < 1e12:
        lo, hi = hi, hi * 4
    hi = _smallest(meets, lo, hi, 80)
    below, above = pick(lo if lo < hi else 0.0), pick(hi)
    if removed(above) + tol < budget:  # unreachable by any price (infinite drops): the cap everywhere
        return {n: float(s[-1]) for n in names}
    # the price where the choices jump past the budget: from the choices just under it, layers move
    # to their choice above it, the least drop per removed cost first, until the budget is met (the
    # last one only as far as needed), so no layer is cut past what the budget needs
    idx = below.copy()
    rows = np.arange(len(names))
    moves = [k for k in rows if above[k] != below[k]]
    moves.sort(key=lambda k: (drops_a[k, above[k]] - drops_a[k, below[k]])
               / max(gains_a[k, above[k]] - gains_a[k, below[k]], 1e-12))
    for k in moves:
        if removed(idx) + tol >= budget:
            break
        lo_i, hi_i = int(below[k]), int(above[k])
        step = 1 if hi_i > lo_i else -1
        for j in range(lo_i + step, hi_i + step, step):   # the first grid point that meets it
            idx[k] = j
            if removed(idx) + tol >= budget:
                break
    out = {n: float(s[i]) for n, i in zip(names, idx)}
    if moves and idx[k] != below[k]:  # the last layer moved: between its last two grid points, as far as needed
        rest = removed(idx) - gains_a[k, idx[k]]
        a, b = float(s[idx[k] - step]), float(s[idx[k]])
        out[names[k]] = _smallest(lambda v: rest + cost_at(names[k], a + (b - a) * v) / total >= budget,
                                  0.0, 1.0, 40) * (b - a) + a
    return out


# -- statistics of activations (data criteria) ---------------------------------------------
def channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``x`` of shape ``[B, ...]`` as ``[B, P, C]``: ``C`` channels along ``channel_dim`` (1 for a
    conv output ``[B, C, H, W]``; -1 for a linear output ``[B, T, C]``), ``P`` positions each.

    Examples
    --------
    >>> channels_last(torch.zeros(2, 3, 4, 5), 1).shape, channels_last(torch.zeros(2, 7, 3), -1).shape
    (torch.Size([2, 20, 3]), torch.Size([2, 7, 3]))
    """
    x = x.movedim(channel_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def apoz(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Average Percentage of Zeros per channel (Hu et al. 2016, "Network Trimming", eq. 1): the
    fraction of the entries of channel ``c`` (over the batch and every position) that are
    ``<= 0``, i.e. zero after the ReLU that follows. Returns ``[C]`` in [0, 1].

    Examples
    --------
    >>> apoz(torch.tensor([[1.0, -2.0], [0.0, 3.0], [-1.0, 4.0]]), -1)
    tensor([0.6667, 0.3333])
    """
    return (channels_last(x, channel_dim) <= 0).float().mean(dim=(0, 1))


def histogram_entropy(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Shannon entropy (nats) of each column of ``values`` ``[N, C]``, from a histogram of its N
    values in ``bins`` equal bins spanning that column's own [min, max] (Luo & Wu 2017, "An
    Entropy-based Pruning Method for CNN Compression", eq. 1: H = -sum_i p_i log p_i). A constant
    column has entropy 0. Returns ``[C]`` in [0, log(bins)].

    Examples
    --------
    >>> histogram_entropy(torch.tensor([[0.0, 5.0], [1.0, 5.0]]), bins=2)   # log 2, constant
    tensor([0.6931, 0.0000])
    >>> histogram_entropy(torch.tensor([[0.0], [0.1], [0.2], [1.0]]), bins=4)  # counts 3, 0, 0, 1
    tensor([0.5623])
    """
    if bins < 1:
        raise ValueError(f"histogram_entropy: bins must be >= 1, got {bins}")
    v = values.float()
    lo, hi = v.min(dim=0).values, v.max(dim=0).values
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    idx = ((v - lo) / width * bins).long().clamp_(0, bins - 1)        # [N, C]: each value's bin
    counts = torch.zeros(bins, v.shape[1]).scatter_add_(0, idx, torch.ones_like(v))
    p = counts / v.shape[0]
    return torch.special.entr(p).sum(dim=0) + 0.0      # entr: -p log p, 0 at p = 0; + 0.0: no -0.0


def capped_lowest(scores: list[torch.Tensor], k: int, caps: list[int]) -> list[torch.Tensor]:
    """Keep-masks removing the ``k`` lowest scores over all tensors together, no tensor losing
    more than ``caps[i]`` elements (the next lowest elsewhere go instead); ties by position.

    Used for whole units (heads, layers) where every group must keep some: a cap of ``n - 1``
    keeps at least one. Raises ValueError when ``k > sum(caps)``.

    Examples
    --------
    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    >>> [m.tolist() for m in capped_lowest([a, b], 2, [1, 2])]
    [[False, True], [False, True, True]]
    """
    if k > sum(caps):
        raise ValueError(f"{k} removals asked for, at most {sum(caps)} allowed by the caps")
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    start = [0]
    for s in scores:
        start.append(start[-1] + s.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    removed = [0] * len(scores)
    for j in torch.sort(flat, stable=True).indices.tolist():
        if k == 0:
            break
        i = int(owner[j])
        if removed[i] < caps[i]:
            keep[j], removed[i], k = False, removed[i] + 1, k - 1
    return [keep[start[i]:start[i + 1]].reshape(s.shape) for i, s in enumerate(scores)]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask keeping the ``n`` highest scores in every ``m`` consecutive elements of
    each row (N:M semi-structured sparsity, Mishra et al. 2021, "Accelerating Sparse Deep Neural
    Networks"; NVIDIA's 2:4).

    ``scores`` is ``[rows, k]`` or any shape whose trailing dimensions flatten into ``k`` per
    row (``[out, in, kh, kw]`` groups along ``in*kh*kw`` in storage order); ``k`` must be a
    multiple of ``m``. Ties keep the earlier position (a stable sort), so every group keeps
    exactly ``n`` elements even when scores are equal (weights already zero).

    Raises
    ------
    ValueError
        ``not 0 < n <= m`` or a row length that is not a multiple of ``m``.

    Examples
    --------
    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 0.0, 4.0]]).abs(), 2, 4).int()
    tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.int32)
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    if rows.shape[1] % m:
        raise ValueError(f"rows of {rows.shape[1]} elements do not split into groups of {m}")
    groups = rows.float().reshape(-1, m)                                   # (rows * k / m, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)
