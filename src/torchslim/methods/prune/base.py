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

import re
from dataclasses import dataclass

from torch import nn

from ...config import MethodConfig, option
from ...errors import RecipeError
from ...modules import select_modules, weight_names
from ...train.config import TrainConfig

#: the classes a ``re:`` target pattern picks: layers computing on activations (Linear, every
#: Conv/ConvTranspose, nn.MultiheadAttention's q/k/v projections, LSTM/GRU/RNN). Embeddings
#: (lookup tables, often tied to an output layer) are pruned only when named exactly, as is
#: any other module holding weights (Bilinear, a custom layer's ``weight`` parameter).
PATTERN_KINDS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)

GRANULARITY_WORDS = ("weight", "channel", "head", "layer")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(granularity: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (N kept of every M); None for the other granularities."""
    found = _NM.match(granularity)
    return (int(found.group(1)), int(found.group(2))) if found else None


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
                             doc="fraction removed (of weights, channels, heads or layers)")
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
    samples: int = option(128, low=1, doc="calibration examples for criteria that need data "
                                          "(taylor, activation, entropy)")
    finetune: TrainConfig | None = option(None, doc="training after (gradual: during) pruning")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names (any module with weights) or re: patterns "
                                                     "(they pick Linear, Conv, ConvTranspose, MultiheadAttention, "
                                                     "LSTM/GRU/RNN)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left untouched")

    CHANGES_WEIGHTS = True

    @property
    def name(self) -> str:
        """The criterion this config's method uses (``magnitude`` for MagnitudePruneConfig)."""
        return getattr(type(self), "CRITERION", "magnitude")

    def check_targets(self, model: nn.Module) -> None:
        prunable_weights(model, self.targets, self.ignore)

    def check_model(self, model: nn.Module) -> None:
        if parse_nm(self.granularity) is not None:
            nm_weights(model, self)

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
        if self.initial_sparsity > self.sparsity:
            raise RecipeError(f"{cls}.initial_sparsity: must not exceed sparsity "
                              f"({self.initial_sparsity} > {self.sparsity})")


def run_prune(model: nn.Module, config: PruneConfig, session, criterion: str) -> nn.Module:
    """Prune ``model`` in place as ``config`` says, ranking with the registered ``criterion``."""
    from .criteria import get_criterion
    entry = get_criterion(criterion)
    if parse_nm(config.granularity) is not None or config.granularity == "weight":
        from .unstructured import prune_weights
        return prune_weights(model, config, session, entry)
    raise RecipeError(f"prune.granularity {config.granularity!r}: not available yet")
