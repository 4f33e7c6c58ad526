"""What the coded quantization methods share (``kmeans``, ``log``, ``binary``, ``ternary``,
``float``): targets, the layer classes of :mod:`torchslim.layers.codebook`, ties, the layers
left in float (reported), the optional fine-tuning (``finetune``, k-means) and the optional
quantization-aware training (``qat``, binary and ternary: :class:`QatCodedQuantConfig`).

A method file declares a config subclass naming its ``SCHEME`` and the bits a layer gets, and
registers ``quantize.NAME`` with a handler calling :func:`run_coded`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ...config import MethodConfig, option
from ...edits import replace_module
from ...errors import RecipeError
from ...layers import CodedConv1d, CodedConv2d, CodedConv3d, CodedEmbedding, CodedLinear
from ...modules import check_patterns, matches, select_modules
from ...train.config import TrainConfig
from .layer_error import FloatReference

log = logging.getLogger(__name__)

#: float class -> its coded layer (exact classes: a subclass of Linear with its own forward is
#: not the same layer; ``nn.MultiheadAttention``'s ``out_proj`` is a plain Linear subclass
#: it only reads the weight and bias of, so it is coded too)
CODED = {nn.Linear: CodedLinear, nn.Conv1d: CodedConv1d, nn.Conv2d: CodedConv2d, nn.Conv3d: CodedConv3d,
         nn.Embedding: CodedEmbedding, nn.modules.linear.NonDynamicallyQuantizableLinear: CodedLinear}
#: the classes a ``re:`` pattern picks (an Embedding is coded when named exactly);
#: nn.MultiheadAttention is picked to be reported: its packed projection has no coded layer
PATTERN_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def refusal(module: nn.Module) -> str | None:
    """Why ``module`` gets no coded layer, or None."""
    if type(module) not in CODED:
        return (f"no coded layer exists for {type(module).__name__} (coded: Linear, Conv1d, Conv2d, Conv3d, "
                "Embedding; quantize.linear handles nn.MultiheadAttention)")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode {module.padding_mode!r} is not supported (coded convolutions pad with zeros)"
    if getattr(module, "max_norm", None) is not None:
        return "max_norm renormalizes rows on lookup, which codes cannot follow; set max_norm=None"
    return None


@dataclass(frozen=True)
class CodedQuantConfig(MethodConfig):
    """Fields every coded quantization method accepts."""

    targets: tuple[str, ...] = option(("re:.*",), doc="module names (Embedding too) or re: patterns (they pick "
                                                     "Linear, Conv1d/2d/3d)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns kept in float")

    CHANGES_WEIGHTS = True
    #: the scheme of :mod:`torchslim.layers.codebook` the method writes
    SCHEME: ClassVar[str] = ""
    #: what the contract tests expect of a random-init model after the method's example: the
    #: cosine of its outputs to the float ones, and whether weights may become zero
    OUTPUT_COSINE: ClassVar[float] = 0.99
    KEEPS_NONZEROS: ClassVar[bool] = True
    #: why the method has no ``qat`` field (the error a recipe giving ``qat:`` gets)
    NO_QAT: ClassVar[str] = ("its codes have no fake quantization to train through; use quantize.linear, "
                             "quantize.binary or quantize.ternary with qat:")

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "CodedQuantConfig":
        """As :meth:`MethodConfig.from_dict`; a ``qat`` key on a method without quantization-aware
        training is a RecipeError saying why and what to use."""
        if isinstance(data, dict) and "qat" in data and "qat" not in cls.__dataclass_fields__:
            raise RecipeError(f"{where or cls.__name__}: qat is not available for quantize.{cls.SCHEME}: "
                              f"{cls.NO_QAT}")
        return super().from_dict(data, where)

    def layer_coding(self, name: str) -> tuple[int, str | None]:
        """``(bits, storage)`` of layer ``name``."""
        raise NotImplementedError

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return select_modules(model, self.targets, self.ignore, kinds=PATTERN_KINDS, what="quantize.targets",
                              refuse=refusal)

    def check_targets(self, model: nn.Module) -> None:
        self.select(model)


@dataclass(frozen=True)
class QatCodedQuantConfig(CodedQuantConfig):
    """A coded method whose coding has a fake quantization (``binary``, ``ternary``): it accepts
    ``qat``, training through :class:`~torchslim.train.qat.FakeQuantPlugin` with ``SCHEME``."""

    qat: TrainConfig | None = option(None, doc="quantization-aware training before coding: fine-tune with the "
                                               "weights fake-quantized exactly as they are then stored (per "
                                               "output channel, straight-through estimator); train fields. "
                                               "binary and ternary only (k-means trains its codebook with "
                                               "finetune:)")


def run_coded(model: nn.Module, config: CodedQuantConfig, session: Any) -> nn.Module:
    """Replace every targeted layer by its coded layer (ties kept: one code tensor for a tied
    weight), report the layers a pattern picked that stay in float (``skipped`` in the row and a
    ``not_quantized`` warning), then fine-tune when the config has ``finetune`` with epochs.

    With ``qat`` (epochs > 0) the model first trains with the coded layers' weights
    fake-quantized by the coding's own rule (:func:`~.qat.train_qat`, scheme ``config.SCHEME``),
    so the coded layers then built from the trained weights compute what the last QAT forward
    computed (up to float rounding)."""
    qat = getattr(config, "qat", None)
    if qat is not None and qat.epochs > 0:
        from .qat import train_qat
        chosen = {name: ["weight"] for name, module in config.select(model) if not refusal(module)}
        train_qat(model, chosen, session, qat, scheme=config.SCHEME)
    done: dict[int, nn.Module] = {}          # id(float weight) -> its coded layer
    skipped, coded = [], {}
    reference = FloatReference(model, session)    # each layer's error, for the row
    for name, module in config.select(model):
        reason = refusal(module)
        if reason:
            skipped.append(f"{name} ({type(module).__name__})")
            log.info("quantize: %s stays in float: %s", name, reason)
            continue
        bits, storage = config.layer_coding(name)
        cls = CODED[type(module)]
        q = cls.from_float(module, config.SCHEME, bits, storage)
        first = done.get(id(module.weight))
        if first is not None and type(first) is cls and first.rebuild_args() == q.rebuild_args():
            q.share_codes_with(first)
        done.setdefault(id(module.weight), q)
        replace_module(model, name, q)
        coded[name] = storage or bits
    if skipped:
        session.warn("not_quantized", f"quantize.{config.SCHEME}: {len(skipped)} layer(s) without a coded layer "
                                      f"stay in float: {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}")
    metrics = session.info.setdefault("metrics", {})
    metrics["skipped"] = skipped
    finetune = getattr(config, "finetune", None)
    reference.record(model, "before fine-tuning" if finetune is not None and finetune.epochs > 0 else None)
    if finetune is not None and finetune.epochs > 0:
        session.train(model, finetune, desc=f"{config.SCHEME}-finetune")
    return model


def bits_for(name: str, bits: int, layer_bits: dict[str, int]) -> int:
    """``layer_bits``' value for the first key naming or matching (``re:``) ``name``, else ``bits``."""
    return next((b for pattern, b in layer_bits.items() if matches(name, pattern)), bits)


def check_layer_keys(model: nn.Module, layer_bits: dict[str, int]) -> None:
    """RecipeError for a ``layer_bits`` key that names or matches no module."""
    check_patterns(model, layer_bits, "quantize.layer_bits")
