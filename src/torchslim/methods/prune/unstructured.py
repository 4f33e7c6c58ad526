"""Granularities ``weight`` and ``N:M``: single weights zeroed by a criterion's ranking.

``weight``: one-shot, gradual (Zhu & Gupta) or iterative (Han et al. 2015), with fine-tuning.
``N:M`` (``2:4``, ``4:8``): in every M consecutive weights of a row the N highest-scoring are
kept (:func:`~.primitives.nm_mask`; rows as :func:`~.base.nm_row_length` says), one-shot, then
fine-tuned with the masks kept.

Pruned weights are exact zeros in the dense tensors; the artifact writer stores such tensors as
a bitmask plus the non-zero values, so sparsity shows up as bytes saved on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ...errors import RecipeError
from ...train.plugins import TrainingPlugin
from .base import PruneConfig, nm_weights, parse_nm, prunable_weights
from .criteria import CriterionEntry, Group, check_scores
from .primitives import cubic_sparsity, global_masks, layer_masks, nm_mask

log = logging.getLogger(__name__)

#: a layer pruned this far is reported: it barely passes a signal
COLLAPSE = 0.99

#: ``scorer(names, weights) -> scores``: one tensor of element scores per weight, same shapes
Scorer = Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]


def magnitude_scorer(names: list[str], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach().abs() for w in weights]


def criterion_scorer(entry: CriterionEntry) -> Scorer:
    """Element scores of each weight from a criterion that needs nothing but the weights."""
    def score(names: list[str], weights: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for n, w in zip(names, weights):
            g = Group(units=w.numel(), weights=[w.detach().reshape(-1, 1)], names=[n])
            out.append(check_scores(entry.fn(g), g, entry.name).reshape(w.shape).to(w.device))
        return out
    return score


def _compute_masks(scores: list[torch.Tensor], sparsity: float, scope: str,
                   max_layer_sparsity: float = 1.0) -> list[torch.Tensor]:
    if scope != "global":
        return layer_masks(scores, sparsity)
    try:
        return global_masks(scores, sparsity, max_layer_sparsity)
    except ValueError as exc:
        raise RecipeError(f"prune.max_layer_sparsity: {exc}; raise it or lower sparsity") from None


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:  # a module name: its weight
        return model.get_submodule(name).weight


class MaskPlugin(TrainingPlugin):
    """Holds masks for the target weights and keeps pruned weights at zero after each step.

    ``names`` are parameter names (``lstm.weight_hh_l0``, ``attn.in_proj_weight``) or module
    names, which stand for the module's ``weight``. ``scorer`` ranks the weights (magnitude by
    default). With ``nm = (N, M)`` the masks keep N of every M along each row, whatever the
    sparsity asked of :meth:`prune_to`.

    The trainer checkpoints the masks with each epoch, so a resumed run continues with the masks
    in force when it stopped (the gradual schedule changes them during training).
    """

    def __init__(self, names: list[str], scope: str, max_layer_sparsity: float = 1.0,
                 scorer: Scorer = magnitude_scorer, nm: tuple[int, int] | None = None) -> None:
        self.names, self.scope, self.max_layer_sparsity = names, scope, max_layer_sparsity
        self.scorer, self.nm = scorer, nm
        self.masks: list[torch.Tensor] | None = None

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [_weight(model, n) for n in self.names]

    @torch.no_grad()
    def prune_to(self, model: nn.Module, sparsity: float) -> None:
        ws = self.weights(model)
        # a weight shared by several layers (tied) is ranked once, and they share its mask
        first: dict[int, int] = {}
        unique = [i for i, w in enumerate(ws) if first.setdefault(id(w), i) == i]
        scores = self.scorer([self.names[i] for i in unique], [ws[i] for i in unique])
        found = ([nm_mask(s, *self.nm) for s in scores] if self.nm is not None
                 else _compute_masks(scores, sparsity, self.scope, self.max_layer_sparsity))
        masks = dict(zip((id(ws[i]) for i in unique), found))
        self.masks = [masks[id(w)].to(w.device) for w in ws]
        self.apply(model)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if self.masks is None:
            return
        for w, m in zip(self.weights(model), self.masks):
            w.masked_fill_(~m, 0.0)  # +0.0: a product with 0 would leave -0.0 for negative weights

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        self.apply(model)

    def state_dict(self) -> dict:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self.masks = state["masks"]


class GradualSchedule(MaskPlugin):
    """Raise sparsity along the cubic schedule of Zhu & Gupta (2017, eq. 1) during training,
    ``updates`` times over the first ``ramp`` fraction of the steps; masks hold in between."""

    def __init__(self, names: list[str], config: PruneConfig, scorer: Scorer = magnitude_scorer) -> None:
        super().__init__(names, config.scope, config.max_layer_sparsity, scorer)
        self.config = config

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        c = self.config
        ramp_steps = max(int(c.ramp * total), 1)
        every = max(ramp_steps // c.updates, 1)
        if step <= ramp_steps and (step % every == 0 or step == ramp_steps):
            self.prune_to(model, cubic_sparsity(step, ramp_steps, c.sparsity, c.initial_sparsity))
        else:
            self.apply(model)


def run_schedule(model: nn.Module, config: PruneConfig, ctx, masker: MaskPlugin) -> None:
    """One-shot, gradual or iterative pruning with ``masker``, then the exact target sparsity."""
    ft = config.finetune
    if config.schedule == "oneshot":
        masker.prune_to(model, config.sparsity)
        if ft is not None and ft.epochs > 0:
            ctx.train(model, ft, desc="prune-finetune", plugins=[masker])
    elif config.schedule == "gradual":
        masker.prune_to(model, config.initial_sparsity)
        ctx.train(model, ft, desc="prune-gradual", plugins=[masker])
    else:  # iterative: equal-ratio rounds, each followed by fine-tuning
        keep_per_round = (1.0 - config.sparsity) ** (1.0 / config.iterations)
        for r in range(1, config.iterations + 1):
            masker.prune_to(model, 1.0 - keep_per_round ** r)
            ctx.train(model, ft, desc=f"prune-round{r}", sub=f"train-round{r}", plugins=[masker])
    # the exact target at the end, whatever early stopping restored
    masker.prune_to(model, config.sparsity)


def report_sparsity(model: nn.Module, names: list[str], masker: MaskPlugin, config: PruneConfig, ctx,
                    what: str) -> None:
    """Log per-layer sparsity, warn on collapsed layers, record ``layer_sparsity`` in the row."""
    # keyed by module name for a layer's `weight`, by parameter name for other weight tensors
    per_layer = {n.removesuffix(".weight"): float((w == 0).float().mean())
                 for n, w in zip(names, masker.weights(model))}
    nm = parse_nm(config.granularity)
    log.info("%s pruning: %s over %d weight tensors: %s", what,
             f"{config.granularity} ({100 * (1 - nm[0] / nm[1]):.1f}% sparsity)" if nm
             else f"{100 * config.sparsity:.1f}% sparsity ({config.scope})", len(names), ", ".join(f"{n} {100 * v:.1f}%" for n, v in per_layer.items()))
    for n, v in per_layer.items():
        if v >= COLLAPSE:
            ctx.warn("layer_collapse", f"{what} pruning removed {100 * v:.2f}% of layer {n}: it barely passes a "
                                       "signal; set max_layer_sparsity (e.g. 0.95) or scope: layer")
    ctx.info.setdefault("metrics", {})["layer_sparsity"] = {n: round(v, 4) for n, v in per_layer.items()}


def prune_weights(model: nn.Module, config: PruneConfig, ctx, entry: CriterionEntry) -> nn.Module:
    """Granularity ``weight`` or ``N:M``: zero single weights ranked by ``entry`` (see the module doc)."""
    nm = parse_nm(config.granularity)
    if nm is None:
        names = prunable_weights(model, config.targets, config.ignore)
    else:
        if "N:M" not in entry.granularities:
            raise RecipeError(f"prune.{entry.name}: this criterion does not score granularity N:M; it scores "
                              f"{', '.join(entry.granularities)}")
        names, skipped = nm_weights(model, config)
        if skipped:
            ctx.warn("nm_skipped", f"{config.granularity} pruning left {len(skipped)} weight(s) dense, their rows "
                                   f"are not a multiple of {nm[1]}: {', '.join(skipped[:6])}"
                                   f"{' ...' if len(skipped) > 6 else ''}; name them in ignore to silence this")
    if entry.needs:
        raise RecipeError(f"prune.{entry.name}: granularity {config.granularity!r} with a criterion that "
                          f"needs {', '.join(entry.needs)}: not available yet")
    scorer = magnitude_scorer if entry.name == "magnitude" else criterion_scorer(entry)
    masker = (MaskPlugin(names, config.scope, config.max_layer_sparsity, scorer, nm) if config.schedule != "gradual"
              else GradualSchedule(names, config, scorer))
    run_schedule(model, config, ctx, masker)
    report_sparsity(model, names, masker, config, ctx, entry.name)
    return model
