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
