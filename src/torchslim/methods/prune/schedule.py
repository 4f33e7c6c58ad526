"""Rounds of structured pruning: how much is gone after each round, and the fine-tuning between.

Channels, heads and layers are removed physically, so a schedule is a list of rounds (prune,
then fine-tune), not a mask that changes during training as for single weights
(``unstructured.py``):

- ``oneshot``: one round to ``sparsity``, then ``finetune`` if given;
- ``iterative``: ``iterations`` rounds, each removing the same fraction of what is left (kept
  fraction ``(1 - s) ** (r / iterations)`` after round ``r``; Han et al. 2015's prune/retrain
  loop), each followed by ``finetune``;
- ``gradual``: ``updates`` rounds along the cubic ramp of Zhu & Gupta 2017 (eq. 1) from
  ``initial_sparsity``, over the first ``ramp`` of the ``finetune`` epochs, training between
  rounds (:func:`gradual_epochs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .primitives import cubic_sparsity

#: a ``PruneConfig`` (not imported: ``base`` imports the granularity modules that import this one)
PruneConfig = Any


def round_ratios(config: PruneConfig, final: float | None = None) -> list[float]:
    """Cumulative fraction removed after each round, towards ``final`` (default ``config.sparsity``;
    a layer with its own sparsity follows the same schedule to its own target).

    Examples
    --------
    >>> from torchslim.methods.prune.magnitude import MagnitudePruneConfig
    >>> c = MagnitudePruneConfig(sparsity=0.875, schedule="iterative", iterations=3, finetune={"epochs": 1})
    >>> [round(r, 4) for r in round_ratios(c)]                 # half of what is left, each round
    [0.5, 0.75, 0.875]
    """
    final = config.sparsity if final is None else final
    if config.schedule == "oneshot":
        return [final]
    if config.schedule == "iterative":  # equal fraction of what is left removed each round
        keep = (1.0 - final) ** (1.0 / config.iterations)
        return [1.0 - keep ** r for r in range(1, config.iterations + 1)]
    n = len(gradual_epochs(config))
    return [cubic_sparsity(r, n, final, min(config.initial_sparsity, final)) for r in range(1, n + 1)]


def gradual_epochs(config: PruneConfig) -> list[int]:
    """Epochs of fine-tuning after each gradual round: ``updates`` rounds (at most one per epoch)
    over the first ``ramp`` of the epochs; the last round also gets the epochs after the ramp.

    Examples
    --------
    >>> from torchslim.methods.prune.magnitude import MagnitudePruneConfig
    >>> gradual_epochs(MagnitudePruneConfig(schedule="gradual", updates=3, ramp=0.5, finetune={"epochs": 8}))
    [2, 1, 5]
    """
    epochs = config.finetune.epochs
    ramp = max(1, min(epochs, int(round(config.ramp * epochs))))
    n = min(config.updates, ramp)
    split = [ramp // n + (1 if i < ramp % n else 0) for i in range(n)]
    split[-1] += epochs - ramp
    return split


def finetune_round(model: nn.Module, config: PruneConfig, session, r: int) -> None:
    """The fine-tuning after round ``r`` (from 1) of ``config.schedule``: all of ``finetune``
    after a one-shot cut or each iterative round, the round's share of the epochs when gradual
    (:func:`gradual_epochs`). Each iterative or gradual round trains in its own checkpoint
    directory (``train-roundN``), so a resumed run finds each round's epochs. Nothing without
    ``finetune``."""
    ft = config.finetune
    if ft is None or ft.epochs == 0:
        return
    if config.schedule == "oneshot":
        session.train(model, ft, desc="prune-finetune")
    elif config.schedule == "iterative":
        session.train(model, ft, desc=f"prune-round{r}", sub=f"train-round{r}")
    else:
        session.train(model, dataclasses.replace(ft, epochs=gradual_epochs(config)[r - 1]), desc=f"prune-gradual{r}",
                      sub=f"train-round{r}")
