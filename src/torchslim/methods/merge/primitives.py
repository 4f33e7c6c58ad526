"""Model-merging math on tensors only: one tensor per ingredient in, one merged tensor out.

Each function merges the values of one parameter across models of one architecture; the
method files apply them tensor by tensor over state_dicts. Inputs are float tensors of one
shape; the arithmetic is done in float32 (float64 for slerp) and the result has the dtype of
the first input. No modules, no I/O.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..prune.primitives import topk_mask

#: slerp falls back to linear interpolation when |cos| of the two tensors is above this (mergekit's
#: DOT_THRESHOLD): the angle is too small for sin(theta) to be divided by safely
SLERP_DOT_THRESHOLD = 0.9995


def _f32(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to(torch.float32) for t in tensors]


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``sum_i w_i * theta_i / sum_i w_i`` (the uniform model soup when ``weights`` is None:
    Wortsman et al. 2022, "Model soups", eq. 1 with equal weights).

    ``tensors``: one tensor per model, all of one shape. ``weights``: one non-negative number
    per tensor with a positive sum. Raises ValueError on an empty list, a length mismatch or a
    zero weight sum.

    Examples
    --------
    >>> weighted_mean([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])])
    tensor([2., 4.])
    >>> weighted_mean([torch.tensor([0.0]), torch.tensor([4.0])], weights=[3, 1])
    tensor([1.])
    """
    if not tensors:
        raise ValueError("weighted_mean: no tensors")
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    if len(w) != len(tensors) or sum(w) <= 0:
        raise ValueError(f"weighted_mean: {len(w)} weights (sum {sum(w)}) for {len(tensors)} tensors")
    xs = _f32(tensors)
    out = torch.zeros_like(xs[0])
    for x, wi in zip(xs, w):
        out += wi * x
    return (out / sum(w)).to(tensors[0].dtype)


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """``tau_i = w_i * (theta_i - base)`` in float32 (Ilharco et al. 2023, "Editing models with
    task arithmetic", sec. 2); ``weights`` default to 1.

    Examples
    --------
    >>> task_vectors(torch.tensor([1.0]), [torch.tensor([3.0]), torch.tensor([0.0])], [1.0, 2.0])
    [tensor([2.]), tensor([-2.])]
    """
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    if len(w) != len(tensors):
        raise ValueError(f"task_vectors: {len(w)} weights for {len(tensors)} tensors")
    b = base.detach().to(torch.float32)
    return [wi * (x - b) for x, wi in zip(_f32(tensors), w)]


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """``base + scale * sum_i w_i * (theta_i - base)`` (Ilharco et al. 2023, eq. 1: adding task
    vectors with scaling coefficient lambda = ``scale``).

    Examples
    --------
    >>> task_arithmetic(torch.tensor([1.0]), [torch.tensor([2.0]), torch.tensor([4.0])], scale=0.5)
    tensor([3.])
    """
    taus = task_vectors(base, tensors, weights)
    return (base.detach().to(torch.float32) + scale * torch.stack(taus).sum(0)).to(base.dtype)


def ties_merge_vectors(taus: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of task vectors (Yadav et al. 2023, "TIES-Merging", Algorithm 1, steps 1-3),
    without the scaling: (1) *trim* each ``tau_i`` to its ``round(density * n)`` entries of
    largest magnitude (the others set to 0; per tensor, as mergekit does); (2) *elect* the sign
    of each entry as the sign of the sum of the trimmed vectors; (3) *disjoint mean*: the mean
    of the trimmed entries whose sign agrees with the elected one (0 where none does).

    Examples
    --------
    >>> a, b = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-1.0, -3.0, 1.0])
    >>> ties_merge_vectors([a, b], density=1.0)   # signs: +, -, +
    tensor([ 2.0000, -2.0000,  0.7500])
    >>> ties_merge_vectors([a, b], density=2 / 3)  # a loses 0.5, b loses -1.0
    tensor([ 2., -2.,  1.])
    """
    trimmed = torch.stack([t * topk_mask(t.abs(), 1.0 - density).to(t.dtype) for t in taus])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    total = (trimmed * agree).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float = 0.2, scale: float = 1.0,
         weights: Sequence[float] | None = None) -> torch.Tensor:
    """``base + scale * ties_merge_vectors(w_i * (theta_i - base), density)`` (Yadav et al.
    2023, Algorithm 1, step 4: theta = theta_init + lambda * tau_m).

    Examples
    --------
    >>> ties(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])], density=1.0)
    tensor([2., 2.])
    """
    merged = ties_merge_vectors(task_vectors(base, tensors, weights), density)
    return (base.detach().to(torch.float32) + scale * merged).to(base.dtype)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario", eq. 2): drop each entry with
    probability ``p = 1 - density`` and rescale the kept ones by ``1 / (1 - p)``, so the
    expectation of every entry is unchanged. ``generator`` (a CPU ``torch.Generator``) draws the
    Bernoulli mask; density 0 drops everything.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> out = dare_drop(torch.ones(1000), 0.25, g)
    >>> sorted(set(out.tolist())), abs(out.mean().item() - 1.0) < 0.2
    ([0.0, 4.0], True)
    """
    if density <= 0.0:
        return torch.zeros_like(tau)
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep.to(tau.device), tau / density, torch.zeros_like(tau))


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float, generator: torch.Generator,
         scale: float = 1.0, weights: Sequence[float] | None = None) -> torch.Tensor:
    """``base + scale * sum_i dare_drop(w_i * (theta_i - base))``: DARE followed by task
    arithmetic (Yu et al. 2024, sec. 3). One mask per task vector, drawn in order from
    ``generator``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> dare(torch.zeros(3), [torch.tensor([1.0, 2.0, 3.0])], density=1.0, generator=g)
    tensor([1., 2., 3.])
    """
    taus = [dare_drop(t, density, generator) for t in task_vectors(base, tensors, weights)]
    return (base.detach().to(torch.float32) + scale * torch.stack(taus).sum(0)).to(base.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation between two tensors (Shoemake 1985), as mergekit merges
    two models: with ``theta = arccos(<a/|a|, b/|b|>)``,
    ``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``, computed on the
    tensors as they are (their norms interpolate too); ``(1 - t) a + t b`` when
    ``|cos theta| > dot_threshold`` (nearly colinear) or either tensor is all zeros. t=0 gives
    ``a``, t=1 gives ``b``.

    Examples
    --------
    >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    tensor([0.7071, 0.7071])
    >>> slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), 0.5)   # colinear: lerp
    tensor([1.5000, 3.0000])
    """
    x, y = a.detach().to(torch.float64), b.detach().to(torch.float64)
    nx, ny = x.norm(), y.norm()
    if nx <= eps or ny <= eps:
        return ((1 - t) * x + t * y).to(a.dtype)
    dot = float((x / nx * (y / ny)).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return ((1 - t) * x + t * y).to(a.dtype)
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s * x + math.sin(t * theta) / s * y).to(a.dtype)


def first_mismatch(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                   first: str = "the first model", this: str = "the other") -> str | None:
    """The first difference of names or shapes between two state_dicts, in words (``first`` and
    ``this`` name the two models), or None when they match.

    Examples
    --------
    >>> first_mismatch({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)})
    "tensor 'w' has shape [2, 3] in the first model and [3, 2] in the other"
    >>> first_mismatch({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, "A", "B")
    "tensor 'w' of A is missing in B"
    """
    for name, ref in reference.items():
        if name not in other:
            return f"tensor {name!r} of {first} is missing in {this}"
        if tuple(other[name].shape) != tuple(ref.shape):
            return (f"tensor {name!r} has shape {list(ref.shape)} in {first} and "
                    f"{list(other[name].shape)} in {this}")
    for name in other:
        if name not in reference:
            return f"tensor {name!r} of {this} is missing in {first}"
    return None
