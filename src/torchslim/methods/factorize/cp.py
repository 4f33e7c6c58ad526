"""``factorize: {method: cp}``: each convolution as four small ones (CP decomposition)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...edits import replace_module
from ...layers import CPConv2d
from ...registry import register_method
from . import primitives as P
from .base import ConvFactorizeConfig, conv_geometry, finish, put_factors, spectrum_entry

DEFAULT_FRACTION = 0.25


@dataclass(frozen=True)
class CPFactorizeConfig(ConvFactorizeConfig):
    """Replace each targeted ``nn.Conv2d`` (groups 1, k x k with k > 1 when picked by a pattern) by
    a rank-R CP decomposition of its kernel as four convolutions (Lebedev et al. 2015): a
    ``CPConv2d`` of 1x1 (C_in -> R), k_h x 1 depthwise, 1 x k_w depthwise, 1x1 (R -> C_out, the
    bias), computed by tensorly's ``parafac`` (ALS, seeded). ``R * (C_in + k_h + k_w + C_out)``
    weights instead of ``C_out * C_in * k_h * k_w``.

    ``rank``: an integer R per layer (any R >= 1 is a valid CP rank; one that would not make the
    layer smaller leaves it dense with a ``no_gain`` warning), or a fraction in (0, 1) of each
    layer's weights the factors hold (default 0.25). CP by ALS approximates less tightly than
    Tucker at equal size and usually needs ``finetune``. The row gets ``ranks`` and ``spectra``
    (of the output-channel unfolding). Needs ``tensorly`` (``torchslim[lowrank]``).

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:digits-cnn")
    >>> c = torchslim.apply(m, CPFactorizeConfig(rank=16, targets=("2",)))
    >>> type(c[2]).__name__, c[2].rank
    ('CPConv2d', 16)
    """

    iterations: int = option(50, low=1, doc="alternating least squares sweeps (stops early when the "
                                            "relative error changes by under 1e-6)")

    def max_rank(self, module: nn.Module) -> int:
        return module.weight.numel()        # no bound below the number of weights; no_gain says more

    @classmethod
    def example(cls) -> "CPFactorizeConfig":
        return cls(rank=4, iterations=2)


@register_method("factorize.cp", CPFactorizeConfig)
def _factorize_cp(model: nn.Module, config: CPFactorizeConfig, session) -> nn.Module:
    """CP decomposition of convolutions into four small convolutions (Lebedev et al. 2015)."""
    config.check_model(model)
    ranks, entries, no_gain = {}, {}, []
    for name, conv in config.select(model):
        shape = tuple(conv.weight.shape)
        r = config.rank if isinstance(config.rank, int) else P.cp_rank_for_fraction(
            shape, config.rank or DEFAULT_FRACTION)
        entries[name] = spectrum_entry(P.unfold_spectrum(conv.weight, 0))
        if r * sum(shape) >= conv.weight.numel():
            no_gain.append(f"{name} (rank {r} of {shape[0]}x{shape[1]}x{shape[2]}x{shape[3]})")
            continue
        a, b, c, d = P.cp(conv.weight, r, config.iterations)
        new = CPConv2d(**conv_geometry(conv), rank=r)
        replace_module(model, name, put_factors(new, conv, {"first": b.T, "vertical": c.T, "horizontal": d.T,
                                                           "last": a}))
        ranks[name] = r
    return finish(model, config, session, "factorize.cp", ranks, entries, no_gain)
