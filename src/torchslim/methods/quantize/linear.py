"""Round-to-nearest linear weight quantization (``quantize: {method: linear}``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import MethodConfig, option
from ...errors import RecipeError
from ...edits import replace_module
from ...modules import select_modules
from ...registry import register_method
from ...layers import QuantConv2d, QuantLinear


@dataclass(frozen=True)
class LinearQuantConfig(MethodConfig):
    """Quantize Linear/Conv2d weights to ``bits``-bit integer codes with float scales.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> q = torchslim.apply(m, LinearQuantConfig(bits=8))
    >>> q[1].weight_q.dtype
    torch.int8
    """

    bits: int = option(8, low=2, high=8, doc="bits per weight code")
    granularity: str = option("channel", choices=("tensor", "channel", "group"),
                              doc="one scale per tensor, output channel, or group of inputs")
    group_size: int = option(128, low=2, doc="inputs per scale for granularity: group")
    symmetric: bool = option(True, doc="symmetric (zero point 0) or affine")
    activations: str = option("none", choices=("none",), doc="activation quantization (weight-only now)")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names or re: patterns")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns kept in float")

    CHANGES_WEIGHTS = True

    def check_model(self, model: nn.Module) -> None:
        """RecipeError naming every targeted layer whose inputs per channel ``group_size`` does
        not divide (granularity: group)."""
        if self.granularity != "group":
            return
        bad = [(name, m.weight[0].numel()) for name, m in select_modules(model, self.targets, self.ignore,
                                                                         what="quantize.targets")
               if m.weight[0].numel() % self.group_size]
        if bad:
            shown = ", ".join(f"{n} ({k})" for n, k in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise RecipeError(f"quantize.group_size: {self.group_size} does not divide the inputs per channel "
                              f"of {len(bad)} targeted layer(s): {shown}; pick a divisor or add them to ignore")


@register_method("quantize.linear", LinearQuantConfig)
def _linear_quant(model: nn.Module, config: LinearQuantConfig, ctx) -> nn.Module:
    """Round-to-nearest affine/symmetric weight quantization, per tensor, channel or group."""
    qargs = dict(bits=config.bits, granularity=config.granularity, group_size=config.group_size,
                 symmetric=config.symmetric)
    done: dict[int, nn.Module] = {}  # id(float weight) -> its quantized layer: ties are kept
    config.check_model(model)
    for name, module in select_modules(model, config.targets, config.ignore, what="quantize.targets"):
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
        q = cls.from_float(module, **qargs)
        first = done.get(id(module.weight))
        if first is not None and type(first) is cls and first.weight_q.shape == q.weight_q.shape:
            q.share_codes_with(first)
        done.setdefault(id(module.weight), q)
        replace_module(model, name, q)
    return model
