"""Unstructured magnitude pruning: one-shot, gradual (Zhu & Gupta) or iterative, with fine-tuning.

Pruned weights are exact zeros in the dense tensors; the artifact writer stores such tensors as
a bitmask plus the non-zero values, so sparsity shows up as bytes saved on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...config import MethodConfig, option
from ...errors import RecipeError
from ...modules import select_modules, weight_names
from ...registry import register_method
from ...train.config import TrainConfig
from ...train.plugins import TrainingPlugin
from .primitives import cubic_sparsity, global_masks, layer_masks

log = logging.getLogger(__name__)

#: a layer pruned this far is reported: it barely passes a signal
COLLAPSE = 0.99

#: the classes a ``re:`` target pattern picks: layers computing on activations (Linear, every
#: Conv/ConvTranspose, nn.MultiheadAttention's q/k/v projections, LSTM/GRU/RNN). Embeddings
#: (lookup tables, often tied to an output layer) are pruned only when named exactly, as is
#: any other module holding weights (Bilinear, a custom layer's ``weight`` parameter).
PATTERN_KINDS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)


def _unprunable(module: nn.Module) -> str | None:
    if weight_names(module):
        return None
    return ("it has no weight tensor of its own to prune (biases and norm scales are not pruned); for "
            "the layers inside a block, use a pattern such as 're:BLOCK\\..*'")


def prunable_weights(model: nn.Module, targets: tuple[str, ...] = ("re:.*",), ignore: tuple[str, ...] = (),
                     what: str = "prune.targets") -> list[str]:
    """Parameter names (``fc.weight``, ``lstm.weight_hh_l0``, ``attn.in_proj_weight``) of every weight
    tensor of the modules ``targets`` choose (see :data:`PATTERN_KINDS` and
    :func:`torchslim.modules.select_modules`); raises RecipeError for a named module without weights."""
    chosen = select_modules(model, targets, ignore, kinds=PATTERN_KINDS, what=what, refuse=_unprunable)
    return [f"{n}.{w}" for n, m in chosen for w in weight_names(m)]


@dataclass(frozen=True)
class MagnitudePruneConfig(MethodConfig):
    """Remove the smallest-magnitude weights of the targeted layers.

    Every weight tensor of a targeted module is pruned: ``weight`` of Linear, Conv1d/2d/3d,
    ConvTranspose and Embedding, ``weight_ih_l*``/``weight_hh_l*`` of LSTM/GRU/RNN, the packed
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) of ``nn.MultiheadAttention``; never biases or
    norm scales. ``re:`` patterns pick Linear, convolutions, MultiheadAttention and recurrent
    layers; an Embedding (or any other module with weights) is pruned when named exactly. A
    named module without weights of its own (a norm layer, a block) is refused.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> small = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.9, scope="layer"))
    >>> round(float((small[1].weight == 0).float().mean()), 2)
    0.9
    """

    sparsity: float = option(0.5, low=0.0, high=1.0, high_open=True, doc="fraction of weights removed")
    granularity: str = option("weight", choices=("weight",), doc="what is removed (weight: unstructured)")
    scope: str = option("global", choices=("global", "layer"),
                        doc="global: one threshold over all targets; layer: same sparsity per layer")
    max_layer_sparsity: float = option(1.0, low=0.0, high=1.0, low_open=True,
                                       doc="global: no layer loses more than this fraction (the rest "
                                           "falls on the others)")
    schedule: str = option("oneshot", choices=("oneshot", "gradual", "iterative"),
                           doc="oneshot; gradual: cubic ramp during fine-tuning; iterative: rounds")
    initial_sparsity: float = option(0.0, low=0.0, high=1.0, high_open=True, doc="gradual: start")
    ramp: float = option(0.75, low=0.0, high=1.0, low_open=True,
                         doc="gradual: fraction of fine-tuning steps over which sparsity rises")
    updates: int = option(20, low=1, doc="gradual: number of mask updates during the ramp")
    iterations: int = option(3, low=1, doc="iterative: prune/fine-tune rounds")
    finetune: TrainConfig | None = option(None, doc="training after (gradual: during) pruning")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names (any module with weights) or re: patterns "
                                                     "(they pick Linear, Conv, ConvTranspose, MultiheadAttention, "
                                                     "LSTM/GRU/RNN)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left dense")

    CHANGES_WEIGHTS = True

    def check_targets(self, model: nn.Module) -> None:
        prunable_weights(model, self.targets, self.ignore)

    def validate(self) -> None:
        if self.schedule != "oneshot" and (self.finetune is None or self.finetune.epochs == 0):
            raise RecipeError(f"MagnitudePruneConfig.finetune: schedule {self.schedule!r} prunes while "
                              "fine-tuning; give finetune: {epochs: N} with N >= 1, or use schedule: oneshot")
        if self.schedule == "gradual" and self.finetune is not None and self.finetune.early_stopping:
            raise RecipeError("MagnitudePruneConfig.finetune.early_stopping: not available with schedule "
                              "gradual: epochs are pruned to different sparsities, so the best one is an "
                              "early, denser epoch; set early_stopping: 0 or use schedule: oneshot/iterative")
        if self.initial_sparsity > self.sparsity:
            raise RecipeError("MagnitudePruneConfig.initial_sparsity: must not exceed sparsity "
                              f"({self.initial_sparsity} > {self.sparsity})")


def _compute_masks(weights: list[torch.Tensor], sparsity: float, scope: str,
                   max_layer_sparsity: float = 1.0) -> list[torch.Tensor]:
    scores = [w.detach().abs() for w in weights]
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
    names, which stand for the module's ``weight``.

    The trainer checkpoints the masks with each epoch, so a resumed run continues with the masks
    in force when it stopped (the gradual schedule changes them during training).
    """

    def __init__(self, names: list[str], scope: str, max_layer_sparsity: float = 1.0) -> None:
        self.names, self.scope, self.max_layer_sparsity = names, scope, max_layer_sparsity
        self.masks: list[torch.Tensor] | None = None

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [_weight(model, n) for n in self.names]

    @torch.no_grad()
    def prune_to(self, model: nn.Module, sparsity: float) -> None:
        ws = self.weights(model)
        # a weight shared by several layers (tied) is ranked once, and they share its mask
        first: dict[int, int] = {}
        unique = [w for i, w in enumerate(ws) if first.setdefault(id(w), i) == i]
        masks = dict(zip((id(w) for w in unique),
                         _compute_masks(unique, sparsity, self.scope, self.max_layer_sparsity)))
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

    def __init__(self, names: list[str], config: "MagnitudePruneConfig") -> None:
        super().__init__(names, config.scope, config.max_layer_sparsity)
        self.config = config

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        c = self.config
        ramp_steps = max(int(c.ramp * total), 1)
        every = max(ramp_steps // c.updates, 1)
        if step <= ramp_steps and (step % every == 0 or step == ramp_steps):
            self.prune_to(model, cubic_sparsity(step, ramp_steps, c.sparsity, c.initial_sparsity))
        else:
            self.apply(model)


@register_method("prune.magnitude", MagnitudePruneConfig)
def _magnitude(model: nn.Module, config: MagnitudePruneConfig, ctx) -> nn.Module:
    """Unstructured magnitude pruning (global or per layer; one-shot, gradual or iterative)."""
    names = prunable_weights(model, config.targets, config.ignore)
    masker = (MaskPlugin(names, config.scope, config.max_layer_sparsity) if config.schedule != "gradual"
              else GradualSchedule(names, config))
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
    # keyed by module name for a layer's `weight`, by parameter name for other weight tensors
    per_layer = {n.removesuffix(".weight"): float((w == 0).float().mean())
                 for n, w in zip(names, masker.weights(model))}
    log.info("magnitude pruning: %.1f%% sparsity (%s) over %d weight tensors: %s", 100 * config.sparsity,
             config.scope, len(names), ", ".join(f"{n} {100 * v:.1f}%" for n, v in per_layer.items()))
    for n, v in per_layer.items():
        if v >= COLLAPSE:
            ctx.warn("layer_collapse", f"magnitude pruning removed {100 * v:.2f}% of layer {n}: it barely passes a "
                                       "signal; set max_layer_sparsity (e.g. 0.95) or scope: layer")
    ctx.info.setdefault("metrics", {})["layer_sparsity"] = {n: round(v, 4) for n, v in per_layer.items()}
    return model
