"""Importance criteria: a plain callable ``group -> 1-D scores`` per name.

A :class:`Group` holds the weights that are removed together, as ``units`` rows: the elements
of one tensor (granularity ``weight`` and ``N:M``), the coupled channels of a structured group
(a conv's filters with the BatchNorm entries and the consumers' input slices that go with them),
or attention heads. A criterion returns one score per unit; higher means more important, and
the lowest-scoring units are removed. Criteria that need data say so (``needs``), and the
pruning step then fills ``grads`` / ``activations`` / ``zeros`` from calibration batches.

Register your own with :func:`register_criterion`; ``prune: {method: NAME}`` then uses it with
every granularity its ``needs`` allow.

Examples
--------
>>> g = Group(units=2, weights=[torch.tensor([[3.0, -4.0], [1.0, 0.0]])])
>>> get_criterion("magnitude").fn(g)         # L1 norm of each unit's weights
tensor([7., 1.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import RecipeError, did_you_mean

#: what a criterion may need besides the weights
NEEDS = ("grads", "activations")


@dataclass
class Group:
    """Weights removed together, as ``units`` rows, and the statistics a criterion may read.

    Attributes
    ----------
    units:
        Number of prunable units (tensor elements, channels, heads).
    weights:
        One ``[units, k_i]`` tensor per member: row ``u`` holds the values of member ``i``
        that belong to unit ``u`` (a filter flattened, a BatchNorm scale as ``k_i = 1``, a
        consumer's input-channel slice).
    grads:
        Same shapes as ``weights``: the loss gradient w.r.t. those values, summed over the
        calibration batches (``None`` for a criterion that does not need gradients).
    activations:
        ``[samples, units]``: each unit's output per calibration example (spatial mean for a
        conv channel, token mean for a linear neuron); ``None`` when not needed or when units
        have no output of their own (single weights).
    zeros:
        ``[units]``: fraction of each unit's output positions that are <= 0 on the calibration
        data (after the ReLU that follows, zero): APoZ of Hu et al. 2016.
    names:
        One label per member (``layer1.0.conv1.weight[out]``), for messages.
    """

    units: int
    weights: list[torch.Tensor]
    grads: list[torch.Tensor] | None = None
    activations: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)


Criterion = Callable[[Group], torch.Tensor]


@dataclass(frozen=True)
class CriterionEntry:
    name: str
    fn: Criterion
    needs: tuple[str, ...]
    #: granularities it can score: ``activations``-based ones need units with outputs
    granularities: tuple[str, ...]
    summary: str


_CRITERIA: dict[str, CriterionEntry] = {}

#: every granularity; an ``N:M`` pattern scores like ``weight``
GRANULARITIES = ("weight", "channel", "head", "layer", "N:M")


def register_criterion(name: str, fn: Criterion | None = None, *, needs: Sequence[str] = (),
                       granularities: Sequence[str] = GRANULARITIES) -> Callable:
    """Register ``fn(group) -> Tensor[units]`` as criterion ``name`` (usable as a decorator).

    ``needs``: any of ``"grads"``, ``"activations"``; ``granularities``: where it applies.
    Registering a name again replaces the earlier criterion.
    """
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"register_criterion: unknown needs {bad}; accepted: {', '.join(NEEDS)}")

    def deco(f: Criterion) -> Criterion:
        summary = ((f.__doc__ or "").strip().splitlines() or [""])[0]
        _CRITERIA[name] = CriterionEntry(name, f, tuple(needs), tuple(granularities), summary)
        return f
    return deco(fn) if fn is not None else deco


def get_criterion(name: str) -> CriterionEntry:
    """The registered criterion ``name``; RecipeError naming the close matches otherwise."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise RecipeError(f"prune: unknown criterion {name!r}{did_you_mean(name, list(_CRITERIA))}; "
                          f"registered: {', '.join(sorted(_CRITERIA))}") from None


def list_criteria() -> list[CriterionEntry]:
    return [_CRITERIA[k] for k in sorted(_CRITERIA)]


def check_scores(scores: torch.Tensor, group: Group, name: str) -> torch.Tensor:
    """Check a criterion's result: a finite 1-D tensor of ``group.units`` scores."""
    if not isinstance(scores, torch.Tensor) or scores.shape != (group.units,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RecipeError(f"prune criterion {name!r} returned {got} for a group of {group.units} units "
                          f"({', '.join(group.names[:3])}); it must return a 1-D tensor of {group.units} scores")
    if not torch.isfinite(scores).all():
        raise RecipeError(f"prune criterion {name!r} returned non-finite scores for {', '.join(group.names[:3])}")
    return scores.float()


def lp_norm(group: Group, p: int = 1) -> torch.Tensor:
    """Sum over members of each unit's L``p`` norm to the power ``p`` (L1: sum of |w|; L2: sum
    of w^2), the group magnitude of Li et al. 2017 (L1) and Torch-Pruning's group norm."""
    total = torch.zeros(group.units)
    for w in group.weights:
        total += w.detach().float().abs().pow(p).sum(dim=1).cpu()
    return total


@register_criterion("magnitude")
def magnitude(group: Group) -> torch.Tensor:
    """L1 norm of each unit's weights (Han et al. 2015 for single weights; Li et al. 2017 for filters)."""
    return lp_norm(group, 1)
