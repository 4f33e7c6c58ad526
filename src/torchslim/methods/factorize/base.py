"""What every factorization method shares: ``rank``, ``finetune``, targets, the rank checks and
the step's record (chosen ranks and singular-value spectra in the metrics row).

A method file declares its config (the layer classes it factorizes, the largest rank a layer
allows, the weights a rank costs) and registers ``factorize.NAME`` with a handler that computes
the factors (``primitives.py``) and puts a layer of ``torchslim.layers.lowrank`` in place
through :func:`torchslim.edits.replace_module`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...config import MethodConfig, option
from ...errors import RecipeError, UserError
from ...modules import select_modules
from ...train.config import TrainConfig

log = logging.getLogger(__name__)

#: modules whose Linear children are read as tensors (``out_proj.weight``, ``linear1.weight`` in
#: torch's fused attention and encoder fast paths), so a factorized child would break them
READ_BY_PARENT = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

#: singular values kept per layer in the metrics row (``spectra``), normalized by the largest
SPECTRUM_POINTS = 256


@dataclass(frozen=True)
class FactorizeConfig(MethodConfig):
    """Fields every factorization method accepts (CONTRACT §4, ``factorize``)."""

    rank: int | float | None = option(None, low=0.0, low_open=True,
                                      doc="an integer rank per layer, or a fraction in (0, 1): of the spectral "
                                          "energy kept (svd, tucker; default 0.9) or of the weights kept (cp; "
                                          "default 0.25)")
    finetune: TrainConfig | None = option(None, doc="training after factorization (recovers accuracy)")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names or re: patterns (they pick the method's "
                                                     "layer classes)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left dense")

    CHANGES_WEIGHTS = True
    CHANGES_SHAPES = True       # a layer becomes two to four smaller ones ...
    CHANGES_NAMES = True        # ... its children (``fc.first``, ``fc.second``)
    #: the classes a ``re:`` pattern picks; a module named exactly may be any of these too
    KINDS: ClassVar[tuple[type, ...]] = (nn.Linear,)

    def validate(self) -> None:
        if isinstance(self.rank, float) and self.rank == 1.0:
            raise RecipeError(f"{type(self).__name__}.rank: 1.0 is ambiguous: write 1 for rank one, or a "
                              "fraction below 1 (e.g. 0.99) for the energy or weights kept")
        if isinstance(self.rank, float) and not 0.0 < self.rank < 1.0:
            raise RecipeError(f"{type(self).__name__}.rank: {self.rank!r} is neither an integer rank nor a "
                              "fraction in (0, 1)")

    # -- what a method declares --------------------------------------------------------------
    def refusal(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be factorized by this method, or None."""
        if type(module) not in self.KINDS:
            return f"only {'/'.join(k.__name__ for k in self.KINDS)} layers are factorized by this method"
        return None

    def max_rank(self, module: nn.Module) -> int:
        """The largest integer ``rank`` the layer allows."""
        raise NotImplementedError

    # -- shared checks -----------------------------------------------------------------------
    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The targeted layers; a pattern passes over layers this method refuses (logged) and the
        Linears of :data:`READ_BY_PARENT` modules."""
        what = "factorize.targets"
        chosen = select_modules(model, self.targets, self.ignore, kinds=self.KINDS, what=what, refuse=self.refusal)
        for n, m in chosen:
            parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
            if isinstance(parent, READ_BY_PARENT) and n in self.targets:
                raise RecipeError(f"{what}: module {n!r} is read as a tensor by its {type(parent).__name__} (not "
                                  "called), so it cannot be factorized; remove it from targets")
        chosen = [(n, m) for n, m in chosen
                  if not isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model, READ_BY_PARENT)]
        kept = [(n, m) for n, m in chosen if not self.refusal(m) or n in self.targets]
        names = {n for n, _ in kept}
        skipped = [f"{n} ({self.refusal(m)})" for n, m in chosen if n not in names]
        if skipped:
            log.info("%s: patterns pass over %s", what, ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
        if not kept:
            raise RecipeError(f"{what}: no layer this method can factorize matches targets={list(self.targets)} "
                              f"ignore={list(self.ignore)}")
        return kept

    def check_targets(self, model: nn.Module) -> None:
        self.select(model)

    def check_model(self, model: nn.Module) -> None:
        """RecipeError naming every layer named in ``targets`` whose largest rank an integer
        ``rank`` exceeds. A layer a ``re:`` pattern picks (a classifier with 10 outputs under
        ``rank: 64``) is left dense by the method with a ``no_gain`` warning instead."""
        if not isinstance(self.rank, int):
            return
        bad = [(n, self.max_rank(m)) for n, m in self.select(model)
               if self.rank > self.max_rank(m) and n in self.targets]
        if bad:
            shown = ", ".join(f"{n} (max rank {k})" for n, k in bad[:8]) + (
                f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise RecipeError(f"factorize.rank: {self.rank} exceeds the largest rank of {len(bad)} targeted "
                              f"layer(s): {shown}; lower rank, give a fraction, or add them to ignore")

    #: whether the method computes its factors with tensorly (an optional package)
    NEEDS_TENSORLY: ClassVar[bool] = False

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        if self.NEEDS_TENSORLY:
            require_tensorly(type(self).__name__)


def require_tensorly(what: str) -> None:
    try:
        import tensorly  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs the tensorly package: pip install 'torchslim[lowrank]' "
                        "(or pip install 'tensorly>=0.8')") from None


def spectrum_entry(s: torch.Tensor) -> list[float]:
    """The first :data:`SPECTRUM_POINTS` singular values divided by the largest (JSON floats)."""
    top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
    return [round(float(v) / top, 5) for v in s[:SPECTRUM_POINTS]]


def finish(model: nn.Module, config: FactorizeConfig, session, what: str, ranks: dict, spectra: dict,
           no_gain: list[str]) -> nn.Module:
    """Record ranks and spectra in the step's metrics row, warn about layers left dense, fine-tune."""
    if no_gain:
        session.warn("no_gain", f"{what}: {len(no_gain)} layer(s) left dense, since their factors would hold "
                                f"at least as many weights: {', '.join(no_gain[:6])}"
                                f"{' ...' if len(no_gain) > 6 else ''}; lower rank or add them to ignore")
    metrics = session.info.setdefault("metrics", {})
    metrics["ranks"], metrics["spectra"] = ranks, spectra
    if config.finetune is not None and config.finetune.epochs > 0:
        session.train(model, config.finetune, desc=f"{what}-finetune")
    return model


# -- convolutions (tucker, cp) --------------------------------------------------------------
@dataclass(frozen=True)
class ConvFactorizeConfig(FactorizeConfig):
    """A factorization of ``nn.Conv2d`` kernels: ``re:`` patterns pick k x k convolutions with
    k > 1 and groups 1 (a 1x1 one is a matrix, a depthwise one already cheap); a convolution named
    exactly is factorized whatever its kernel, unless grouped or padded other than with zeros."""

    KINDS: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    NEEDS_TENSORLY: ClassVar[bool] = True

    def refusal(self, module: nn.Module) -> str | None:
        if type(module) is not nn.Conv2d:
            return "only nn.Conv2d layers are factorized by this method"
        if module.groups != 1:
            return f"it is a grouped convolution (groups={module.groups}), already cheap per channel"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} is not supported (the factors pad with zeros)"
        return None

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = [(n, m) for n, m in super().select(model) if n in self.targets or max(m.kernel_size) > 1]
        if not chosen:
            raise RecipeError(f"factorize.targets: no k x k convolution with k > 1 matches targets="
                              f"{list(self.targets)} ignore={list(self.ignore)} (name a 1x1 one to factorize it)")
        return chosen


def conv_geometry(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=list(conv.kernel_size),
                stride=list(conv.stride), dilation=list(conv.dilation), bias=conv.bias is not None,
                padding=conv.padding if isinstance(conv.padding, str) else list(conv.padding))


def put_factors(new: nn.Module, conv: nn.Conv2d, factors: dict[str, torch.Tensor]) -> nn.Module:
    """``new`` on ``conv``'s device, dtype and mode, with ``factors`` (child name -> weight) and
    ``conv``'s bias on its ``last`` child."""
    w = conv.weight
    new = new.to(device=w.device, dtype=w.dtype).train(conv.training)
    with torch.no_grad():
        for child, value in factors.items():
            getattr(new, child).weight.copy_(value.reshape(getattr(new, child).weight.shape))
        if conv.bias is not None:
            new.last.bias.copy_(conv.bias)
    return new
