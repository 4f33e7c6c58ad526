"""GPTQ weight quantization (``quantize: {method: gptq}``), layer by layer on calibration data."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...config import MethodConfig, option
from ...edits import replace_module
from ...errors import RecipeError, UserError
from ...layers import QuantLinear
from ...modules import select_modules
from ...registry import register_method
from .calibration import (CalibrationConfig, calibration_batches, calibration_option, require_data, smooth_option,
                          token_rows)
from .gptq_math import gptq_quantize
from .layer_error import FloatReference
from .smooth import smooth_model

log = logging.getLogger(__name__)

GPTQ_NEEDS = "GPTQ (the Hessian of each layer's inputs)"


def _refusal(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return None
    if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
        return "GPTQ here handles Linear layers only; quantize it in a quantize.linear step"
    return "only Linear layers are quantized by GPTQ"


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ (Frantar et al., ICLR 2023): each Linear layer's weight is rounded column by column,
    the rounding error of each column spread over the columns not yet rounded through the
    inverse Hessian ``H = 2 X X^T`` of the layer's calibration inputs
    (:func:`~torchslim.methods.quantize.gptq_math.gptq_quantize`). Layers run in model order on
    the session's sequential runner, so each layer's inputs come from the model as quantized so
    far. The result is ``QuantLinear`` layers, stored and loaded like ``quantize.linear``'s.

    Needs a task with data (the training split gives ``calibration.samples`` examples); token
    tasks' padding positions are left out of ``H``. A Linear that calibration never reaches
    (a ``nn.MultiheadAttention``'s ``out_proj``, which its forward reads as a tensor) is
    rounded to nearest, and the step's warnings say so. ``re:`` patterns pick Linear layers;
    a named module of another class is refused.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:digits-cnn")
    >>> q = torchslim.apply(m, GPTQConfig(bits=4, group_size=64, calibration={"samples": 32}), task="digits")
    >>> type(q[6]).__name__, q[6].bits, tuple(q[6].scale.shape)
    ('QuantLinear', 4, (128, 16))
    """

    bits: int = option(4, low=2, high=8, doc="bits per weight code")
    granularity: str = option("group", choices=("tensor", "channel", "group"),
                              doc="one scale per tensor, output channel, or group of group_size inputs")
    group_size: int = option(128, low=2, doc="inputs per scale for granularity: group (must divide in_features)")
    symmetric: bool = option(True, doc="symmetric (zero point 0) or affine codes")
    block_size: int = option(128, low=1, doc="columns per lazy batch update (speed only)")
    damp: float = option(0.01, low=0.0, high=1.0, low_open=True,
                         doc="fraction of the mean Hessian diagonal added to its diagonal before inverting")
    act_order: bool = option(True, doc="round columns by decreasing Hessian diagonal (activation order; groups "
                                       "keep their scales from the float weight)")
    smooth: float | None = smooth_option()
    calibration: CalibrationConfig = calibration_option()
    targets: tuple[str, ...] = option(("re:.*",), doc="Linear module names or re: patterns")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns kept in float")

    CHANGES_WEIGHTS = True

    @classmethod
    def example(cls) -> "GPTQConfig":
        return cls(bits=4, granularity="channel", calibration=CalibrationConfig(samples=32))

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        require_data(task, "quantize.gptq", GPTQ_NEEDS)

    def check_targets(self, model: nn.Module) -> None:
        _select(model, self)

    def check_model(self, model: nn.Module) -> None:
        """RecipeError naming every targeted Linear whose ``in_features`` ``group_size`` does not
        divide (granularity: group)."""
        if self.granularity != "group":
            return
        bad = [f"{n} ({m.in_features})" for n, m in _select(model, self) if m.in_features % self.group_size]
        if bad:
            raise RecipeError(f"quantize.group_size: {self.group_size} does not divide the inputs of {len(bad)} "
                              f"targeted layer(s): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; "
                              "pick a divisor or add them to ignore")


def _select(model: nn.Module, config: GPTQConfig) -> list[tuple[str, nn.Module]]:
    return select_modules(model, config.targets, config.ignore, kinds=(nn.Linear,), what="quantize.targets",
                          refuse=_refusal)


def layer_hessian(task, batches: list, inputs: list[torch.Tensor], name: str) -> torch.Tensor | None:
    """``2 X X^T / n`` (in, in) of a layer's calibration inputs (one tensor per batch, in batch
    order), padding rows left out; None when there were none. UserError naming the layer when an
    input is not finite."""
    h, n = None, 0
    for batch, x in zip(batches, inputs):
        rows = token_rows(task, batch, x).float()
        if not torch.isfinite(rows).all():
            raise UserError(f"quantize.gptq: the calibration inputs of {name} hold NaN or inf; "
                            "the model before it is not finite on the task's data")
        h = rows.T @ rows if h is None else h + rows.T @ rows
        n += rows.shape[0]
    return None if h is None or n == 0 else 2.0 * h / n


@register_method("quantize.gptq", GPTQConfig)
def _gptq(model: nn.Module, config: GPTQConfig, session) -> nn.Module:
    """GPTQ weight quantization with Hessian error compensation from calibration data."""
    config.check_model(model)
    chosen = _select(model, config)
    batches = calibration_batches(session, config.calibration, "quantize.gptq", GPTQ_NEEDS)
    if config.smooth is not None:
        done = smooth_model(model, config.smooth, session, batches, {n for n, _ in chosen})
        log.info("quantize.gptq: SmoothQuant alpha %s on %d layer group(s)", config.smooth, done)
    qargs = dict(bits=config.bits, granularity=config.granularity, group_size=config.group_size,
                 symmetric=config.symmetric)
    first: dict[int, QuantLinear] = {}   # id(float weight) -> its quantized layer: a tie stays one tensor
    rounded: list[str] = []

    def quantize_layer(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        q = QuantLinear.from_float(module, **qargs)             # round-to-nearest to start with
        tied = first.get(id(module.weight))
        if tied is not None:
            q.share_codes_with(tied)
        else:
            first[id(module.weight)] = q
            h = layer_hessian(session.task, batches, inputs, name)
            if h is None:
                rounded.append(name)
            else:
                w = module.weight.detach().float()
                codes, scale, zero = gptq_quantize(w, h.to(w.device), config.bits, config.granularity,
                                                   config.group_size, config.symmetric, block_size=config.block_size,
                                                   damp=config.damp, act_order=config.act_order)
                q.set_codes(codes.to(q.weight_q.device), scale.to(q.scale.device),
                            None if config.symmetric else zero.to(q.scale.device))
        replace_module(model, name, q)

    reference = FloatReference(model, session, config.calibration)    # each layer's error, for the row
    session.sequential(model, [n for n, _ in chosen], batches, quantize_layer)
    reference.record(model)
    if rounded:
        session.warn("gptq-uncalibrated", f"quantize.gptq: no calibration input reached {len(rounded)} layer(s) "
                                          f"({', '.join(rounded[:5])}{' ...' if len(rounded) > 5 else ''}): "
                                          "rounded to nearest")
    return model
