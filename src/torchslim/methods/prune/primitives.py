"""Pruning math on tensors only: scores in, masks out. No modules, no I/O."""

from __future__ import annotations

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
                 max_layer_sparsity: float = 1.0) -> list[torch.Tensor]:
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
    caps = [int(max_layer_sparsity * n) for n in sizes]          # most removable per tensor
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
