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


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks for several tensors with one threshold across all of them (global scope)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = topk_mask(flat, sparsity)
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


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
