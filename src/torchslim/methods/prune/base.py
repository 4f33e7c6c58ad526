"""What every pruning method shares: the config fields and the dispatch by granularity.

Pruning is split three ways (Torch-Pruning's structure / importance / policy, STYLE.md R3):

- **structure**: which weights go together: single elements (``weight``, ``N:M``,
  ``unstructured.py``), coupled channels across residuals and concatenations
  (``structured.py``, on torch-pruning's ``DependencyGraph``), attention heads and whole
  layers (``heads.py``);
- **importance**: a criterion ``group -> 1-D scores`` (``criteria.py``), chosen by the method
  name (``prune: {method: taylor}``);
- **schedule**: one-shot, gradual (a training plugin) or iterative rounds, with ``scope``
  global or per layer.

A method file only declares its config (extra fields such as ``alpha``) and registers
``prune.NAME`` with a handler calling :func:`run_prune`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import MethodConfig, option
from ...errors import RecipeError, UserError
from ...modules import check_patterns, matches, select_modules, weight_names
from ...recipe import MAX_BATCH
from ...train.config import TrainConfig
from .criteria import get_criterion
from .primitives import global_masks, layer_masks, nm_mask

#: the classes a ``re:`` target pattern picks: layers computing on activations (Linear, every
#: Conv/ConvTranspose, nn.MultiheadAttention's q/k/v projections, LSTM/GRU/RNN). Embeddings
#: (lookup tables, often tied to an output layer) are pruned only when named exactly, as is
#: any other module holding weights (Bilinear, a custom layer's ``weight`` parameter).
PATTERN_KINDS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)

GRANULARITY_WORDS = ("weight", "channel", "head", "layer")
#: granularities that remove units physically (shapes change)
STRUCTURED = ("channel", "head", "layer")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(granularity: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (N kept of every M); None for the other granularities."""
    found = _NM.match(granularity)
    return (int(found.group(1)), int(found.group(2))) if found else None


def rank_masks(scores: list[torch.Tensor], sparsity: float, scope: str = "global",
               max_layer_sparsity: float = 1.0) -> list[torch.Tensor]:
    """Keep-masks removing the lowest-scoring ``sparsity`` fraction: over all tensors at once
    (``global``, no tensor losing more than ``max_layer_sparsity``) or in each (``layer``)."""
    if scope != "global":
        return layer_masks(scores, sparsity)
    try:
        return global_masks(scores, sparsity, max_layer_sparsity)
    except ValueError as exc:
        raise RecipeError(f"prune.max_layer_sparsity: {exc}; raise it or lower sparsity") from None


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


def nm_row_length(weight) -> int:
    """Length of the rows N:M groups run along: a weight viewed as ``[shape[0], -1]`` (a Linear's
    input features, a conv filter's ``in*kh*kw`` in storage order; 0 for a 1-D tensor)."""
    return weight.numel() // weight.shape[0] if weight.dim() >= 2 and weight.shape[0] else 0


def nm_weights(model: nn.Module, config: "PruneConfig") -> tuple[list[str], list[str]]:
    """The weights granularity ``N:M`` prunes, and those it skips.

    Returns ``(names, skipped)``: parameter names as :func:`prunable_weights` gives them, and one
    ``"name (rows of K)"`` per weight matched only by a ``re:`` pattern whose rows (see
    :func:`nm_row_length`) do not split into groups of M (the pruning step warns about them).

    Raises
    ------
    RecipeError
        a module named exactly in ``targets`` with such a weight, or nothing left to prune.
    """
    n, m = parse_nm(config.granularity)
    chosen = select_modules(model, config.targets, config.ignore, kinds=PATTERN_KINDS, what="prune.targets",
                            refuse=_unprunable)
    names, skipped = [], []
    for name, module in chosen:
        for w in weight_names(module):
            k = nm_row_length(getattr(module, w))
            if k and k % m == 0:
                names.append(f"{name}.{w}")
            elif name in config.targets:
                raise RecipeError(f"prune.granularity {config.granularity}: {name}.{w} has rows of {k} weights "
                                  f"(shape {list(getattr(module, w).shape)}), not a multiple of {m}; "
                                  "remove it from targets or add it to ignore")
            else:
                skipped.append(f"{name}.{w} (rows of {k})")
    if not names:
        raise RecipeError(f"prune.granularity {config.granularity}: no targeted weight has rows that split into "
                          f"groups of {m} ({', '.join(skipped[:4])}); target other layers or choose another M")
    return names, skipped


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Fields every pruning criterion accepts (CONTRACT §4, ``prune``).

    ``granularity`` says what is removed: ``weight`` (single weights, zeros in dense tensors,
    stored compactly), ``channel`` (conv filters / linear neurons physically removed with every
    coupled layer), ``head`` (attention heads), ``layer`` (whole residual blocks / transformer
    layers), or ``N:M`` such as ``2:4`` (N weights kept in every M consecutive ones along the
    input dimension).
    """

    sparsity: float = option(0.5, low=0.0, high=1.0, high_open=True,
                             doc="fraction removed (of weights, channels, heads or layers; with ratios sensitivity "
                                 "or netadapt: of the budget, params or MACs)")
    granularity: str = option("weight", doc="weight | channel | head | layer | N:M (e.g. 2:4)")
    scope: str = option("global", choices=("global", "layer"),
                        doc="global: one ranking over all targets; layer: the same sparsity per layer")
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
    round_to: int = option(1, low=1, doc="channel: kept channel counts rounded to a multiple of this "
                                         "(e.g. 8); 1 = no rounding")
    samples: int = option(128, low=1, doc="calibration examples for criteria that need data "
                                          "(taylor, activation, entropy)")
    finetune: TrainConfig | None = option(None, doc="training after (gradual: during) pruning")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names (any module with weights) or re: patterns "
                                                     "(granularity weight: they pick Linear, Conv, ConvTranspose, "
                                                     "MultiheadAttention, LSTM/GRU/RNN; channel: Conv and Linear "
                                                     "and classes given a pruner; head: attention modules; layer: "
                                                     "residual blocks)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left untouched")
    ratios: str = option("uniform", choices=("uniform", "sensitivity", "netadapt"),
                         doc="uniform: sparsity as scope says; sensitivity (granularity weight, channel, head): per-layer "
                             "sparsities from sensitivity curves that remove the budget at the least predicted "
                             "metric loss; netadapt (granularity channel): per-group sparsities found by NetAdapt, "
                             "rounds of single-group cuts each measured after sensitivity_steps SGD steps (Yang et "
                             "al. 2018)")
    adapt_rounds: int = option(10, low=1, doc="ratios netadapt: rounds, each cutting one group to a smaller target "
                                              "(the budget reached geometrically); about rounds x groups short "
                                              "fine-tunes")
    sensitivity: str | None = option(None, doc="ratios sensitivity: a sensitivity.json from `torchslim "
                                               "sensitivity` (default: measured in the step on the val split)")
    sensitivity_steps: int = option(0, low=0, doc="ratios sensitivity measured in the step: SGD steps each cut is "
                                                  "trained before it is evaluated, so the curves show what a layer "
                                                  "recovers from (NetAdapt's short-term fine-tune; `torchslim "
                                                  "sensitivity --finetune-steps`); 0: one-shot curves. ratios netadapt: the "
                                                  "steps each round's candidates are trained (0: none; NetAdapt "
                                                  "used a short fine-tune, e.g. 100)")
    sensitivity_lr: float = option(0.01, low=0.0, low_open=True, doc="sensitivity_steps: peak learning rate of "
                                                                     "those steps (SGD, momentum 0.9, cosine to 0)")
    budget: str = option("params", choices=("params", "macs", "latency"),
                         doc="ratios sensitivity: sparsity is this fraction of the targeted layers' params or MACs "
                             "(granularity channel, head: of the whole model's, measured); ratios netadapt: of the "
                             "whole model's. latency (granularity channel, head for sensitivity; channel for "
                             "netadapt): of the whole model's forward time, measured at latency_batch_size on "
                             "latency_runtime (NetAdapt, Yang et al. 2018)")
    latency_batch_size: int = option(1, low=1, high=MAX_BATCH, doc="budget latency: batch size of the timed forward "
                                                                   "pass")
    latency_runtime: str = option("eager", doc="budget latency: the runtime timed (eager, onnxruntime, sparse, ...; "
                                               "as measure: runtime; not compile, which recompiles for every "
                                               "candidate)")
    allocation: str = option("equal_drop", choices=("equal_drop", "knapsack"),
                             doc="ratios sensitivity: how curves become ratios. equal_drop: every layer pruned "
                                 "to the same predicted metric drop (Han et al. 2015); knapsack: the least summed "
                                 "predicted drop for the budget, each cut weighed by what it removes (Aflalo et "
                                 "al. 2020; on a ResNet it concentrated the cuts and fine-tuned worse than "
                                 "equal_drop, BENCHMARKS.md)")
    layer_sparsity: dict[str, float] = option(
        default_factory=dict, low=0.0, high=1.0, high_open=True,
        doc="granularity weight, channel or head: {module name or re: pattern: sparsity} for layers pruned to their own "
            "fraction (first match wins); the other targets get sparsity (scope global: one threshold "
            "over them only)")

    CHANGES_WEIGHTS = True
    #: the mask rule decides how much goes (threshold): ``sparsity`` is not a target, and the
    #: masks in force after fine-tuning are kept as they are (no final re-pruning to a target)
    SPARSITY_IS_RESULT: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The criterion this config's method uses (``magnitude`` for MagnitudePruneConfig)."""
        return getattr(type(self), "CRITERION", "magnitude")

    def target_patterns(self) -> dict[str, tuple[str, ...]]:
        return {**super().target_patterns(), **({"layer_sparsity": tuple(self.layer_sparsity)}
                                                  if self.layer_sparsity else {})}

    def kept_everything(self) -> str:
        """Why a rule whose sparsity is its result (``SPARSITY_IS_RESULT``) removed nothing, and
        what to change: the ``nothing_removed`` warning's words."""
        return "its rule kept every unit"

    def keep_masks(self, scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        """Keep-masks (True: kept), one per score tensor (a layer's elements, a group's units).

        The default ranks: the ``round(sparsity * n)`` lowest-scoring units go, over all tensors
        at once (``scope: global``, no tensor losing more than ``max_layer_sparsity``) or in each
        (``scope: layer``). With granularity ``N:M`` each tensor keeps its N highest scores in
        every M along its rows (:func:`~.primitives.nm_mask`), whatever ``sparsity`` says. A
        method with another rule overrides it (``threshold``).

        Raises
        ------
        RecipeError
            When ``max_layer_sparsity`` leaves fewer removable units than ``sparsity`` needs.
        """
        nm = parse_nm(self.granularity)
        if nm is not None:
            return [nm_mask(s, *nm) for s in scores]
        return rank_masks(scores, sparsity, self.scope, self.max_layer_sparsity)

    def check_data(self, task) -> None:
        """RecipeError when the criterion needs calibration data and ``task`` has none (a
        ``shape:`` task: random inputs only). Nothing is checked without a task."""
        needs = get_criterion(self.name).needs
        if not needs or task is None:
            return
        try:
            task.split("train")
        except UserError:
            raise RecipeError(f"prune.{self.name}: the {self.name} criterion needs calibration data "
                              f"({' and '.join(needs)} on training examples), and task {task.spec!r} has none "
                              "(random inputs only); use a task with data (digits, mnist, ...) or "
                              "prune.magnitude") from None

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        self.check_data(task)
        if self.budget == "latency":  # onnxruntime not installed: said now, not after the curves
            from ...runtime import runtime_class
            runtime_class(self.latency_runtime).check_available()
        if self.ratios == "sensitivity" and self.sensitivity is not None:
            from .curves import check_granularity, check_timed, load_curves
            data = load_curves(self.sensitivity)
            check_granularity(data, self.sensitivity, self.granularity)
            if self.budget == "latency":
                check_timed(data, self.sensitivity)
        elif self.ratios == "sensitivity" and task is not None:
            try:
                task.split("val")
            except UserError:
                raise RecipeError(f"prune.ratios: sensitivity measures curves on the val split, and task "
                                  f"{task.spec!r} has no data; give sensitivity: PATH (a sensitivity.json) or "
                                  "use ratios: uniform") from None

    @property
    def CHANGES_SHAPES(self) -> bool:  # noqa: N802 (the capability's name, read by the pipeline)
        """Heads and layers (and channels) are removed physically: later steps see other shapes."""
        return self.granularity in STRUCTURED

    @property
    def CHANGES_NAMES(self) -> bool:  # noqa: N802
        """Dropped layers renumber a ModuleList (``encoder.layer.5`` becomes ``.4``): later steps'
        targets cannot be checked against the model as built."""
        return self.granularity == "layer"

    def check_model(self, model: nn.Module) -> None:
        """Head and layer pruning: the model has attention modules / droppable layers among the
        targets, and ``sparsity`` leaves one in each (RecipeError naming what was searched).
        ``N:M``: every weight named in ``targets`` has rows that split into groups of M
        (:func:`nm_weights`). ``ratios: sensitivity`` with a curves file: its layers are modules
        (or weights) of this model, so curves of another model are refused before any training."""
        self._check_units(model)
        if self.ratios == "sensitivity" and self.sensitivity is not None:
            from .curves import check_layers_exist, load_curves
            try:
                data = load_curves(self.sensitivity)
            except UserError:
                return  # check_ready reports an unreadable file
            check_layers_exist(data, self.sensitivity, model)

    def _check_units(self, model: nn.Module) -> None:
        if parse_nm(self.granularity) is not None:
            nm_weights(model, self)
            return
        if self.granularity not in ("head", "layer"):
            return
        try:
            check_patterns(model, (*self.targets, *self.ignore), "prune.targets")
        except RecipeError:
            return  # the pipeline reports the pattern itself
        from .heads import check_heads, check_layers
        (check_heads if self.granularity == "head" else check_layers)(model, self)

    def check_targets(self, model: nn.Module) -> None:
        if self.granularity == "channel":
            from .roots import channel_targets
            channel_targets(model, self)
            return
        if self.granularity in ("head", "layer"):
            return  # the modules named are attention modules or layers: check_model checks them
        names = prunable_weights(model, self.targets, self.ignore)
        # a layer_sparsity key matching no module at all is the pattern check's error (target_patterns)
        modules = [n for n, _ in model.named_modules() if n]
        found = {k: v for k, v in self.layer_sparsity.items() if any(matches(n, k) for n in modules)}
        dataclasses.replace(self, layer_sparsity=found).sparsity_of(names)

    def sparsity_of(self, names: list[str], model: nn.Module | None = None) -> dict[str, float]:
        """The weight tensors among ``names`` (parameter names, as :func:`prunable_weights` gives)
        that ``layer_sparsity`` sets, with their sparsity: the first key matching the tensor's module
        name (exactly, or a ``re:`` pattern matching the whole name) wins.

        Raises RecipeError for a key that matches no module of ``model`` (naming the nearest
        module names; checked when ``model`` is given) or none of the pruned layers (a module
        outside ``targets``, in ``ignore``, or taken by an earlier key), naming the pruned ones.

        Examples
        --------
        >>> c = PruneConfig(layer_sparsity={"fc1": 0.92, "re:fc.*": 0.5})
        >>> c.sparsity_of(["fc1.weight", "fc2.weight", "conv.weight"])
        {'fc1.weight': 0.92, 'fc2.weight': 0.5}
        """

        keys = list(self.layer_sparsity)
        if model is not None:
            check_patterns(model, keys, "prune.layer_sparsity")
        out, used = {}, set()
        for name in names:
            module = name.rpartition(".")[0]
            key = next((k for k in keys if matches(module, k)), None)
            if key is not None:
                out[name] = self.layer_sparsity[key]
                used.add(key)
        unused = [k for k in keys if k not in used]
        if unused:
            layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
            raise RecipeError(f"prune.layer_sparsity: {', '.join(map(repr, unused))} matches none of the "
                              f"pruned layers (a module outside targets, in ignore, or matched by an earlier "
                              f"key); pruned layers: {', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")
        return out

    def validate(self) -> None:
        cls = type(self).__name__
        nm = parse_nm(self.granularity)
        if self.granularity not in GRANULARITY_WORDS and nm is None:
            raise RecipeError(f"{cls}.granularity: {self.granularity!r} is not one of "
                              f"{', '.join(GRANULARITY_WORDS)} or an N:M pattern such as 2:4")
        if nm is not None and not 0 < nm[0] < nm[1]:
            raise RecipeError(f"{cls}.granularity: N:M needs 0 < N < M, got {self.granularity!r}")
        if nm is not None:
            fixed = 1.0 - nm[0] / nm[1]
            default = type(self).__dataclass_fields__["sparsity"].default
            if abs(self.sparsity - fixed) > 1e-9 and self.sparsity != default:
                raise RecipeError(f"{cls}.sparsity: granularity {self.granularity} fixes sparsity at "
                                  f"{fixed:g} (1 - N/M), got {self.sparsity}; leave sparsity out or set it to {fixed:g}")
            if self.schedule != "oneshot":
                raise RecipeError(f"{cls}.schedule: granularity {self.granularity} prunes one-shot (each group "
                                  f"keeps N of M from the start); use schedule: oneshot with finetune: {{epochs: N}}")
        if self.schedule != "oneshot" and (self.finetune is None or self.finetune.epochs == 0):
            raise RecipeError(f"{cls}.finetune: schedule {self.schedule!r} prunes while "
                              "fine-tuning; give finetune: {epochs: N} with N >= 1, or use schedule: oneshot")
        if self.schedule == "gradual" and self.finetune is not None and self.finetune.early_stopping:
            raise RecipeError(f"{cls}.finetune.early_stopping: not available with schedule "
                              "gradual: epochs are pruned to different sparsities, so the best one is an "
                              "early, denser epoch; set early_stopping: 0 or use schedule: oneshot/iterative")
        if self.ratios == "netadapt":
            if self.granularity != "channel":
                raise RecipeError(f"{cls}.ratios: netadapt adapts channel groups (granularity channel), not "
                                  f"{self.granularity!r}")
            if self.layer_sparsity:
                raise RecipeError(f"{cls}.ratios: netadapt sets every group's sparsity; leave layer_sparsity out")
            if self.SPARSITY_IS_RESULT:
                raise RecipeError(f"{cls}.ratios: netadapt needs a ranking criterion, not the {self.name} rule")
            if self.sensitivity is not None or self.allocation != "equal_drop":
                raise RecipeError(f"{cls}.ratios: netadapt measures its own candidates; sensitivity and allocation "
                                  "are read with ratios: sensitivity only")
            if not self.sparsity > 0:
                raise RecipeError(f"{cls}.sparsity: ratios: netadapt needs the fraction of the model's {self.budget} "
                                  "to remove, above 0")
        elif self.ratios == "sensitivity":
            if self.layer_sparsity:
                raise RecipeError(f"{cls}.ratios: sensitivity sets every layer's sparsity; leave layer_sparsity out")
            if self.SPARSITY_IS_RESULT:
                raise RecipeError(f"{cls}.ratios: sensitivity needs a ranking criterion, not the {self.name} rule")
            if self.granularity not in ("weight", "channel", "head"):
                raise RecipeError(f"{cls}.ratios: sensitivity is available with granularity weight, channel and head, not "
                                  f"{self.granularity!r}")
            if self.budget == "macs" and self.granularity == "weight":
                raise RecipeError(f"{cls}.budget: macs needs granularity channel or head: zeroed single weights "
                                  "leave every MAC of dense execution (use budget: params)")
            if self.sensitivity is not None and self.sensitivity_steps:
                raise RecipeError(f"{cls}.sensitivity_steps: the curves of {self.sensitivity} are measured already; "
                                  "measure them with torchslim sensitivity --finetune-steps N, or leave "
                                  "sensitivity: out to measure them in the step")
        elif self.sensitivity is not None:
            raise RecipeError(f"{cls}.sensitivity: curves are read with ratios: sensitivity only")
        elif self.allocation != "equal_drop":
            raise RecipeError(f"{cls}.allocation: {self.allocation} is read with ratios: sensitivity only")
        elif self.sensitivity_steps:
            raise RecipeError(f"{cls}.sensitivity_steps: read with ratios: sensitivity or netadapt only")
        elif self.budget != "params":
            raise RecipeError(f"{cls}.budget: {self.budget} is read with ratios: sensitivity or netadapt only (with ratios: "
                              "uniform, sparsity is the fraction of units removed)")
        if self.budget == "latency":
            if self.granularity not in ("channel", "head"):
                raise RecipeError(f"{cls}.budget: latency needs granularity channel or head (ratios sensitivity) or "
                                  f"channel (netadapt): zeroed single weights leave a dense model's time as it was")
            from .cost import check_runtime
            check_runtime(self.latency_runtime, f"{cls}.latency_runtime")
        elif self.latency_batch_size != 1 or self.latency_runtime != "eager":
            given = [f for f, default in (("latency_batch_size", 1), ("latency_runtime", "eager"))
                     if getattr(self, f) != default]
            raise RecipeError(f"{cls}.{', '.join(given)}: read with budget: latency only")
        if self.adapt_rounds != 10 and self.ratios != "netadapt":
            raise RecipeError(f"{cls}.adapt_rounds: read with ratios: netadapt only")
        if self.layer_sparsity and self.SPARSITY_IS_RESULT:
            raise RecipeError(f"{cls}.layer_sparsity: the {self.name} rule decides how much each layer loses; "
                              "per-layer sparsities need a ranking criterion (magnitude, taylor, random)")
        if self.layer_sparsity and self.granularity not in ("weight", "channel", "head"):
            raise RecipeError(f"{cls}.layer_sparsity: per-layer sparsity is available with granularity "
                              f"weight, channel and head only, not {self.granularity!r}")
        for key, value in self.layer_sparsity.items():
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise RecipeError(f"{cls}.layer_sparsity: bad regular expression {key!r}: {exc}") from None
            if value > self.max_layer_sparsity:
                raise RecipeError(f"{cls}.layer_sparsity[{key!r}]: {value} exceeds max_layer_sparsity "
                                  f"{self.max_layer_sparsity}")
            if value < self.initial_sparsity:
                raise RecipeError(f"{cls}.layer_sparsity[{key!r}]: {value} is below initial_sparsity "
                                  f"{self.initial_sparsity}")

        entry = get_criterion(self.name)
        kind = "N:M" if nm is not None else self.granularity
        if kind not in entry.granularities:
            why = (" (it reads each unit's output, which single weights do not have)"
                   if "activations" in entry.needs and kind in ("weight", "N:M") else "")
            raise RecipeError(f"{cls}.granularity: criterion {self.name!r} scores "
                              f"{', '.join(entry.granularities)}, not {self.granularity!r}{why}")
        if self.initial_sparsity > self.sparsity:
            raise RecipeError(f"{cls}.initial_sparsity: must not exceed sparsity "
                              f"({self.initial_sparsity} > {self.sparsity})")
