"""Granularities ``weight`` and ``N:M``: single weights zeroed by a criterion's ranking.

``weight``: one-shot, gradual (Zhu & Gupta) or iterative (Han et al. 2015), with fine-tuning.
``N:M`` (``2:4``, ``4:8``): in every M consecutive weights of a row the N highest-scoring are
kept (:func:`~.primitives.nm_mask`; rows as :func:`~.base.nm_row_length` says), one-shot, then
fine-tuned with the masks kept.

Pruned weights are exact zeros in the dense tensors; the artifact writer stores such tensors as
a bitmask plus the non-zero values, so sparsity shows up as bytes saved on disk.

Per-layer overrides (``layer_sparsity: {fc1: 0.92, "re:conv.*": 0.5}``, Han et al. 2015's
per-layer rates): a layer matched by a key is pruned to that fraction by its own ranking; the
other targets get ``sparsity``, each by itself (scope ``layer``) or under one threshold shared by
them alone (scope ``global``: the overridden layers are fixed, and ``sparsity`` is then the
fraction removed from the rest, not from the whole). The schedule takes every layer to its own
target at the same pace. ``max_layer_sparsity`` caps the shared layers only (an override above
it is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ...errors import RecipeError
from ...train.plugins import TrainingPlugin
from .base import PruneConfig, nm_weights, parse_nm, prunable_weights, rank_masks
from .criteria import CriterionEntry, Group, check_scores
from .primitives import cubic_sparsity, topk_mask
from .stats import collect_grads

log = logging.getLogger(__name__)

#: a layer pruned this far is reported: it barely passes a signal
COLLAPSE = 0.99

#: ``scorer(names, weights) -> scores``: one tensor of element scores per weight, same shapes
Scorer = Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]


def magnitude_scorer(names: list[str], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach().abs() for w in weights]


def criterion_scorer(entry: CriterionEntry, grads_of: Callable[[list[str]], dict] | None = None) -> Scorer:
    """Element scores of each weight from a criterion: each element is a unit of one member.

    ``grads_of(names) -> {name: summed loss gradient}`` supplies what a criterion that needs
    ``grads`` reads (:func:`.stats.collect_grads`); it is called at every scoring, so a gradual
    or iterative schedule scores the weights as fine-tuning has left them.
    """
    def score(names: list[str], weights: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = grads_of(names) if grads_of is not None else None
        out = []
        for n, w in zip(names, weights):
            g = Group(units=w.numel(), weights=[w.detach().reshape(-1, 1)], names=[n],
                      grads=None if grads is None else [grads[n].reshape(-1, 1)])
            out.append(check_scores(entry.fn(g), g, entry.name).reshape(w.shape).to(w.device))
        return out
    return score


#: ``rule(scores, sparsity) -> keep-masks``: which elements stay (PruneConfig.keep_masks)
MaskRule = Callable[[list[torch.Tensor], float], list[torch.Tensor]]


def _compute_masks(scores: list[torch.Tensor], sparsity: float, rule: MaskRule,
                   fixed: list[float | None] | None = None) -> list[torch.Tensor]:
    """Keep-masks: a tensor with a ``fixed`` sparsity by its own ranking; the others by ``rule`` at
    ``sparsity`` (per tensor for scope layer, one threshold over them alone for scope global)."""
    fixed = fixed or [None] * len(scores)
    masks = {i: topk_mask(s, f) for i, (s, f) in enumerate(zip(scores, fixed)) if f is not None}
    rest = [i for i, f in enumerate(fixed) if f is None]
    if rest:
        masks.update(zip(rest, rule([scores[i] for i in rest], sparsity)))
    return [masks[i] for i in range(len(scores))]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:  # a module name: its weight
        return model.get_submodule(name).weight


class MaskPlugin(TrainingPlugin):
    """Holds masks for the target weights and keeps pruned weights at zero after each step.

    ``names`` are parameter names (``lstm.weight_hh_l0``, ``attn.in_proj_weight``) or module
    names, which stand for the module's ``weight``. ``scorer`` ranks the weights (magnitude by
    default). ``fixed`` maps some of ``names`` to their own final sparsity (``layer_sparsity``);
    the others share the sparsity given to :meth:`prune_to`.

    ``rule`` turns scores into keep-masks (:meth:`PruneConfig.keep_masks`); by default the
    ranking of ``scope`` and ``max_layer_sparsity``.

    The trainer checkpoints the masks with each epoch, so a resumed run continues with the masks
    in force when it stopped (the gradual schedule changes them during training).
    """

    def __init__(self, names: list[str], scope: str, max_layer_sparsity: float = 1.0,
                 scorer: Scorer = magnitude_scorer, rule: MaskRule | None = None,
                 fixed: dict[str, float] | None = None) -> None:
        self.names, self.scope, self.max_layer_sparsity = names, scope, max_layer_sparsity
        self.scorer = scorer
        self.rule = rule or (lambda scores, sparsity: rank_masks(scores, sparsity, scope, max_layer_sparsity))
        self.fixed = dict(fixed or {})
        self.masks: list[torch.Tensor] | None = None

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [_weight(model, n) for n in self.names]

    @torch.no_grad()
    def prune_to(self, model: nn.Module, sparsity: float, fixed: dict[str, float] | None = None) -> None:
        """Masks at ``sparsity``, the tensors of ``fixed`` (default: the final ``self.fixed``) at
        their own, then applied."""
        fixed = self.fixed if fixed is None else fixed
        ws = self.weights(model)
        # a weight shared by several layers (tied) is ranked once, and they share its mask
        first: dict[int, int] = {}
        unique = [i for i, w in enumerate(ws) if first.setdefault(id(w), i) == i]
        scores = self.scorer([self.names[i] for i in unique], [ws[i] for i in unique])
        if self.masks is not None:
            # what is pruned stays pruned: below every score, so a kept weight that scores as
            # low (a zero gradient under taylor) does not trade places with a pruned one
            scores = [torch.where(self.masks[i].to(s.device), s.float(), -torch.inf) for i, s in zip(unique, scores)]
        masks = dict(zip((id(ws[i]) for i in unique),
                         _compute_masks(scores, sparsity, self.rule, [fixed.get(self.names[i]) for i in unique])))
        self.masks = [masks[id(w)].to(w.device) for w in ws]
        self.apply(model)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if self.masks is None:
            return
        for w, m in zip(self.weights(model), self.masks):
            w.masked_fill_(~m, 0.0)  # +0.0: a product with 0 would leave -0.0 for negative weights

    def prune_along(self, model: nn.Module, final: float, point: Callable[[float], float]) -> None:
        """Prune to ``point(s)`` for each final sparsity ``s``: ``final`` for the shared tensors,
        ``self.fixed``'s own for the others (a schedule's stage, the same for every layer)."""
        self.prune_to(model, point(final), {n: point(s) for n, s in self.fixed.items()})

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        self.apply(model)

    def state_dict(self) -> dict:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self.masks = state["masks"]


class GradualSchedule(MaskPlugin):
    """Raise sparsity along the cubic schedule of Zhu & Gupta (2017, eq. 1) during training,
    ``updates`` times over the first ``ramp`` fraction of the steps; masks hold in between."""

    def __init__(self, names: list[str], config: PruneConfig, scorer: Scorer = magnitude_scorer,
                 fixed: dict[str, float] | None = None) -> None:
        super().__init__(names, config.scope, config.max_layer_sparsity, scorer, config.keep_masks, fixed)
        self.config = config

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        c = self.config
        ramp_steps = max(int(c.ramp * total), 1)
        every = max(ramp_steps // c.updates, 1)
        if step <= ramp_steps and (step % every == 0 or step == ramp_steps):
            self.prune_along(model, c.sparsity, lambda s: cubic_sparsity(step, ramp_steps, s, c.initial_sparsity))
        else:
            self.apply(model)


def run_schedule(model: nn.Module, config: PruneConfig, ctx, masker: MaskPlugin) -> None:
    """One-shot, gradual or iterative pruning with ``masker``, then the exact target sparsity.

    A layer with its own sparsity (``masker.fixed``) follows the same schedule to its own target:
    the gradual ramp from ``initial_sparsity``, or iterative rounds that each keep the same
    fraction of what it had (kept fraction ``(1 - s) ** (r / iterations)`` after round ``r``)."""
    ft = config.finetune
    if config.schedule == "oneshot":
        masker.prune_to(model, config.sparsity)
        if ft is not None and ft.epochs > 0:
            ctx.train(model, ft, desc="prune-finetune", plugins=[masker])
    elif config.schedule == "gradual":
        masker.prune_along(model, config.sparsity, lambda s: config.initial_sparsity)
        ctx.train(model, ft, desc="prune-gradual", plugins=[masker])
    else:  # iterative: equal-ratio rounds, each followed by fine-tuning
        for r in range(1, config.iterations + 1):
            masker.prune_along(model, config.sparsity, lambda s, r=r: 1.0 - (1.0 - s) ** (r / config.iterations))
            ctx.train(model, ft, desc=f"prune-round{r}", sub=f"train-round{r}", plugins=[masker])
    if config.schedule == "oneshot" and (ft is None or ft.epochs == 0):
        return                      # nothing trained: the masks are the target's already
    if config.SPARSITY_IS_RESULT:   # the rule's masks stand: re-applying it now would prune untrained
        masker.apply(model)
    else:                           # the exact target at the end, whatever early stopping restored
        masker.prune_to(model, config.sparsity)


def report_sparsity(model: nn.Module, names: list[str], masker: MaskPlugin, config: PruneConfig, ctx,
                    what: str) -> None:
    """Log per-layer sparsity, warn on collapsed layers, record ``layer_sparsity`` in the row."""
    # keyed by module name for a layer's `weight`, by parameter name for other weight tensors
    ws = masker.weights(model)
    per_layer = {n.removesuffix(".weight"): float((w == 0).float().mean()) for n, w in zip(names, ws)}
    overall = sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)
    how = f"{config.granularity} pattern" if config.granularity != "weight" else config.scope
    if config.granularity == "weight" and masker.fixed and len(masker.fixed) >= len(names):
        how, own = "each layer its own sparsity", ""     # a ratios: sensitivity plan, or layer_sparsity for all
    else:
        own = f", {len(masker.fixed)} with their own" if masker.fixed else ""
    log.info("%s pruning: %.1f%% sparsity (%s%s) over %d weight tensors: %s", what, 100 * overall, how, own, len(names),
             ", ".join(f"{n} {100 * v:.1f}%" for n, v in per_layer.items()))
    for n, v in per_layer.items():
        if v >= COLLAPSE:
            ctx.warn("layer_collapse", f"{what} pruning removed {100 * v:.2f}% of layer {n}: it barely passes a "
                                       "signal; set max_layer_sparsity (e.g. 0.95) or scope: layer")
    ctx.info.setdefault("metrics", {})["layer_sparsity"] = {n: round(v, 4) for n, v in per_layer.items()}


def prune_weights(model: nn.Module, config: PruneConfig, ctx, entry: CriterionEntry) -> nn.Module:
    """Granularity ``weight`` or ``N:M``: zero single weights ranked by ``entry`` (see the module doc).

    A criterion that needs ``grads`` (taylor) gets the loss gradients summed over
    ``config.samples`` calibration examples, taken again at every mask update: once for
    one-shot, once per round for iterative, ``updates`` times for gradual (each costs a
    forward and backward pass over the samples), so the scores follow the fine-tuned weights.
    With ``N:M`` the weights are those :func:`~.base.nm_weights` keeps (an ``nm_skipped``
    warning names the others) and the mask rule keeps N of every M (:meth:`PruneConfig.keep_masks`).
    """
    nm = parse_nm(config.granularity)
    if nm is None:
        names = prunable_weights(model, config.targets, config.ignore)
    else:
        names, skipped = nm_weights(model, config)
        if skipped:
            ctx.warn("nm_skipped", f"{config.granularity} pruning left {len(skipped)} weight(s) dense, their rows "
                                   f"are not a multiple of {nm[1]}: {', '.join(skipped[:6])}"
                                   f"{' ...' if len(skipped) > 6 else ''}; name them in ignore to silence this")
    if "activations" in entry.needs:
        raise RecipeError(f"prune.{entry.name}: granularity {config.granularity!r} with a criterion that "
                          "reads activations: single weights have no output of their own; use granularity "
                          "channel or head")
    if entry.name == "magnitude":
        scorer = magnitude_scorer
    elif "grads" in entry.needs:
        scorer = criterion_scorer(entry, lambda ns: collect_grads(ctx, model, ns, config.samples))
    else:
        scorer = criterion_scorer(entry)
    fixed = config.sparsity_of(names, model)
    masker = (MaskPlugin(names, config.scope, config.max_layer_sparsity, scorer, config.keep_masks, fixed)
              if config.schedule != "gradual" else GradualSchedule(names, config, scorer, fixed))
    zeros = sum(int((w == 0).sum()) for w in masker.weights(model))
    run_schedule(model, config, ctx, masker)
    if config.SPARSITY_IS_RESULT and sum(int((w == 0).sum()) for w in masker.weights(model)) == zeros:
        ctx.warn("nothing_removed", f"{entry.name} pruning removed no weight: {config.kept_everything()}")
    report_sparsity(model, names, masker, config, ctx, entry.name)
    return model
