"""Importance criteria: a plain callable ``group -> 1-D scores`` per name.

A :class:`Group` holds the weights that are removed together, as ``units`` rows: the elements
of one tensor (granularity ``weight`` and ``N:M``), the coupled channels of a structured group
(a conv's filters with the BatchNorm entries and the consumers' input slices that go with them),
or attention heads. A criterion returns one score per unit; higher means more important, and
the lowest-scoring units are removed. Criteria that need data say so (``needs``), and the
pruning step then fills ``grads`` / ``activations`` / ``zeros`` from calibration batches.

Register your own with :func:`torchslim.prune.register_criterion` (:mod:`.custom`); ``prune:
{method: NAME}`` then uses it with every granularity its ``needs`` allow.

Examples
--------
>>> g = Group(units=2, weights=[torch.tensor([[3.0, -4.0], [1.0, 0.0]])])
>>> get_criterion("magnitude").fn(g)         # L1 norm of each unit's weights
tensor([7., 1.])
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import RecipeError, did_you_mean
from .primitives import histogram_entropy

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
        conv channel, token mean for a linear neuron; for a head, the mean |value| of its slice
        of the attention output over the tokens; for a layer, the mean |output - input|);
        ``None`` when not needed or when units have no output of their own (single weights).
    zeros:
        ``[units]``: fraction of each unit's output positions that are <= 0 on the calibration
        data (after the ReLU that follows, zero): APoZ of Hu et al. 2016. ``None`` for layers.
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
    Registering a name again replaces the earlier criterion. This registers the criterion alone;
    :func:`torchslim.prune.register_criterion` (:mod:`.custom`) also makes it the method
    ``prune.NAME``.

    Raises
    ------
    ValueError
        For an unknown ``needs`` entry or granularity.

    Examples
    --------
    >>> @register_criterion("first-heavy")
    ... def first_heavy(group):
    ...     "Keeps the first units."
    ...     return torch.arange(group.units, 0, -1).float()
    >>> get_criterion("first-heavy").fn(Group(units=3, weights=[torch.ones(3, 2)]))
    tensor([3., 2., 1.])
    """
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"register_criterion: unknown needs {bad}; accepted: {', '.join(NEEDS)}")
    wrong = [g for g in granularities if g not in GRANULARITIES]
    if wrong:
        raise ValueError(f"register_criterion: unknown granularities {wrong}; accepted: {', '.join(GRANULARITIES)}")

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


def bind(name: str, **options) -> CriterionEntry:
    """Criterion ``name`` with keyword ``options`` fixed (a config's ``seed``, ``bins``,
    ``statistic``): still a plain ``group -> scores`` callable for every granularity.

    Examples
    --------
    >>> g = Group(units=3, weights=[torch.ones(3, 1)], names=["fc.weight"])
    >>> torch.equal(bind("random", seed=1).fn(g), bind("random", seed=1).fn(g))
    True
    """
    entry = get_criterion(name)
    return dataclasses.replace(entry, fn=functools.partial(entry.fn, **options)) if options else entry


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


#: granularities whose units have an output of their own (what activation criteria read); a
#: layer's is its residual update, whose size ``activation`` ranks and whose histogram ``entropy``
#: does not (see ``heads.py``)
WITH_OUTPUTS = ("channel", "head")


def _require(group: Group, what: str, name: str):
    value = getattr(group, what)
    if value is None:
        raise RecipeError(f"prune criterion {name!r} needs {what} for {', '.join(group.names[:3]) or 'its group'}, "
                          "and none were collected")
    return value


@register_criterion("threshold", granularities=("weight", "channel", "head", "layer"))
def threshold(group: Group) -> torch.Tensor:
    """L1 norm of each unit's weights, kept when >= alpha * the largest in its layer (Han et al. 2015)."""
    return lp_norm(group, 1)


@register_criterion("random")
def random(group: Group, seed: int = 0) -> torch.Tensor:
    """Uniform random scores in [0, 1): the control every criterion should beat.

    The generator is seeded from the CRC-32 of ``seed`` and the group's member names (the CPU
    generator keeps 32 bits of a seed), so a layer gets the same scores whatever else is pruned,
    and two layers, or two seeds, get different ones.
    """
    gen = torch.Generator().manual_seed(zlib.crc32("|".join([str(seed), *group.names]).encode()))
    return torch.rand(group.units, generator=gen)


@register_criterion("taylor", needs=("grads",))
def taylor(group: Group) -> torch.Tensor:
    """First-order Taylor importance |sum over a unit's members of grad * weight| (Molchanov et al. 2019).

    ``grads`` are the loss gradients summed over the calibration examples, so a unit's score is
    ``|sum_members sum_k G[u, k] * W[u, k]|``: the first-order change of the summed loss when
    the unit is removed (Molchanov et al., "Importance Estimation for Neural Network Pruning",
    CVPR 2019, sec. 3: the first-order criterion ``(g_m w_m)^2`` of a single weight and its
    group form ``(sum_{s in S} g_s w_s)^2`` for a filter's members S; the absolute value ranks
    as the square does). For single weights this is ``|G * W|`` per element. The paper averages the squared score over
    mini-batches during training; here the gradient is summed over the calibration set first.
    """
    grads = _require(group, "grads", "taylor")
    total = torch.zeros(group.units)
    for w, g in zip(group.weights, grads):
        total += (g.detach().float() * w.detach().float()).sum(dim=1).cpu()
    return total.abs()


@register_criterion("activation", needs=("activations",), granularities=(*WITH_OUTPUTS, "layer"))
def activation(group: Group, statistic: str = "mean") -> torch.Tensor:
    """Mean |activation| of each unit on calibration data, or 1 - APoZ (Hu et al. 2016).

    ``statistic="mean"``: the mean over calibration examples of the absolute value of each
    example's spatial (token) mean of the unit's activation (after the BatchNorm and activation
    module that directly follow its layer, see :func:`.stats.collect_activations`; the mean activation criterion of
    Molchanov et al. 2017, ICLR, sec. 2.2). ``statistic="apoz"``: ``1 - APoZ``, where APoZ is
    the fraction of the unit's outputs that are <= 0 (zero after ReLU) over all examples and
    positions (Hu et al., "Network Trimming", 2016, eq. 1): units mostly zero go first.
    For a layer (granularity ``layer``) ``mean`` is the mean |output - input| and ``apoz`` is
    refused: a residual update has no ReLU zeros.
    """
    if statistic == "apoz":
        return 1.0 - _require(group, "zeros", "activation").float().cpu()
    if statistic != "mean":
        raise RecipeError(f"prune criterion 'activation': statistic {statistic!r} is not mean or apoz")
    return _require(group, "activations", "activation").float().abs().mean(dim=0).cpu()


@register_criterion("entropy", needs=("activations",), granularities=WITH_OUTPUTS)
def entropy(group: Group, bins: int = 16) -> torch.Tensor:
    """Entropy of each unit's pooled activation over calibration examples (Luo & Wu 2017).

    Each example's output of a channel is global-average-pooled to one value (``activations``
    ``[N, units]``); the N values are put in ``bins`` equal bins over the channel's own range and
    the Shannon entropy of that histogram is the score (Luo & Wu, "An Entropy-based Pruning
    Method for CNN Compression", 2017, eq. 1): a channel whose output barely varies between
    examples carries little information and goes first.
    """
    return histogram_entropy(_require(group, "activations", "entropy"), bins).cpu()
