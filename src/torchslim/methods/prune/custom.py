"""A user's criterion as a pruning method: :func:`register_criterion` registers ``fn(group) ->
scores`` (:mod:`.criteria`) and makes ``prune.NAME`` for it, a :class:`~.base.PruneConfig`
subclass ranking with it, so that recipes (``prune: {method: NAME}``), ``torchslim methods`` and
``config_for(NAME)(sparsity=...)`` in Python reach it.

Kept apart from :mod:`.criteria`, which the pruning code imports: this module imports the
pruning code (the config, the dispatcher) and nothing imports it back but ``torchslim.prune``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...registry import _REGISTRY, _load_builtin, get_method, register_method
from .base import PruneConfig
from .criteria import GRANULARITIES, Criterion
from .criteria import register_criterion as _register
from .dispatch import run_prune


def register_criterion(name: str, fn: Criterion | None = None, *, needs: Sequence[str] = (),
                       granularities: Sequence[str] = GRANULARITIES, method: bool = True) -> Callable:
    """Register ``fn(group) -> Tensor[units]`` (one score per unit, higher kept) as criterion
    ``name`` (usable as a decorator), and with ``method`` (the default), when no method has the
    name yet, make it the pruning method ``prune.NAME`` (every field of
    :class:`~.base.PruneConfig`; ``config_for(NAME)`` is its config class). Registering a name
    again replaces the earlier function. A method written for the criterion (a plugin's
    ``register_method("prune.NAME", ...)``) replaces the one made here.

    ``needs``: any of ``"grads"``, ``"activations"`` (filled from calibration batches);
    ``granularities``: where it applies (``weight``, ``channel``, ``head``, ``layer``, ``N:M``).

    Raises
    ------
    ValueError
        For an unknown ``needs`` entry or granularity, or (with ``method``) a name that is not
        a method name (lower-case letters, digits, ``-``, ``_``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import torchslim
    >>> @register_criterion("doc-last-first")
    ... def last_first(group):
    ...     "Keeps the last units."
    ...     return torch.arange(1, group.units + 1).float()
    >>> cfg = config_for("doc-last-first")(granularity="channel", sparsity=0.5, targets=("0",))
    >>> m = torchslim.apply(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 2, 1)), cfg, task="shape:1x2x2")
    >>> m[0].out_channels, m[1].in_channels
    (2, 2)
    >>> _ = _REGISTRY.pop("prune.doc-last-first")   # (the example's method removed again)
    """
    if method and not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"register_criterion: name {name!r} must be lower-case letters, digits, '-' or '_', "
                         "starting with a letter (it becomes the method name prune.NAME; method=False makes none)")
    register = _register(name, needs=needs, granularities=granularities)

    def deco(f: Criterion) -> Criterion:
        if method:   # the built-in methods and plugins first: a plugin loaded later must not replace f
            _load_builtin()
        register(f)
        if method:
            _make_method(name, ((f.__doc__ or "").strip().splitlines() or [""])[0])
        return f
    return deco(fn) if fn is not None else deco


def _make_method(name: str, summary: str) -> None:
    key = f"prune.{name}"
    if key in _REGISTRY and not getattr(_REGISTRY[key].config_cls, "MADE_FOR_CRITERION", False):
        return               # a method of its own (prune.magnitude ranks with the criterion now registered)
    title = "".join(part.capitalize() for part in re.split(r"[-_]", name))
    cls = dataclass(frozen=True)(type(f"{title}PruneConfig", (PruneConfig,), {
        "__doc__": f"Prune by the registered criterion {name!r}: {summary or 'a user criterion'}",
        "__module__": __name__, "CRITERION": name, "MADE_FOR_CRITERION": True}))

    def handler(model, config, ctx):
        return run_prune(model, config, ctx, name)
    handler.__doc__ = f"Pruning ranked by the registered criterion {name!r}."
    _REGISTRY.pop(key, None)  # registered again: the new class replaces the old
    register_method(key, cls)(handler)


def config_for(name: str) -> type:
    """The config class of the method ``prune.NAME``: the one :func:`register_criterion` made for
    a user's criterion, a plugin's own, or a built-in one (``config_for("magnitude")`` is
    ``MagnitudePruneConfig``).

    Raises
    ------
    RecipeError
        For a name no method has (a criterion registered with ``method=False``, or none).
    """
    return get_method("prune", name).config_cls


__all__ = ["register_criterion", "config_for"]
