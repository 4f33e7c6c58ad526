"""``factorize: {method: tucker}``: each convolution as 1x1 -> core k x k -> 1x1 (Tucker-2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import option
from ...edits import replace_module
from ...layers import TuckerConv2d
from ...registry import register_method
from . import primitives as P
from .base import ConvFactorizeConfig, conv_geometry, finish, put_factors, spectrum_entry

DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class TuckerFactorizeConfig(ConvFactorizeConfig):
    """Replace each targeted ``nn.Conv2d`` (groups 1) by its Tucker-2 decomposition over the output
    and input channels (Kim et al. 2016): a ``TuckerConv2d`` of a 1x1 conv (C_in -> r_in), the core
    k_h x k_w conv (r_in -> r_out, the original stride, padding and dilation) and a 1x1 conv
    (r_out -> C_out, the bias), computed by tensorly's ``partial_tucker`` (HOOI).

    ``rank``: an integer used for both channel modes, each capped at its size (r_in = min(rank,
    C_in)); a rank above both C_in and C_out is an error naming the layer. A fraction in (0, 1):
    per mode, the smallest rank keeping that fraction of the energy of the mode's unfolding
    (default 0.9). ``re:`` patterns pick k x k convolutions with k > 1 (a 1x1 one is a matrix:
    ``svd`` territory); a 1x1 conv named exactly is factorized too. A layer that would not get
    smaller stays dense, with a ``no_gain`` warning. The row gets ``ranks`` ([r_out, r_in]) and
    ``spectra`` (of the output-channel unfolding). Needs ``tensorly`` (``torchslim[lowrank]``).

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:digits-cnn")
    >>> t = torchslim.apply(m, TuckerFactorizeConfig(rank=8, targets=("2",)))
    >>> type(t[2]).__name__, t[2].rank_in, t[2].rank_out
    ('TuckerConv2d', 8, 8)
    """

    iterations: int = option(10, low=1, doc="HOOI sweeps after the HOSVD start (each refines both factors)")

    def max_rank(self, module: nn.Module) -> int:
        return max(module.in_channels, module.out_channels)

    @classmethod
    def example(cls) -> "TuckerFactorizeConfig":
        return cls(rank=4, iterations=2)


def _ranks(conv: nn.Conv2d, rank: int | float | None) -> tuple[int, int, torch.Tensor]:
    """(r_out, r_in, spectrum of the output-mode unfolding)."""
    s_out = P.unfold_spectrum(conv.weight, 0)
    if isinstance(rank, int):
        return min(rank, conv.out_channels), min(rank, conv.in_channels), s_out
    energy = rank or DEFAULT_ENERGY
    return P.rank_for_energy(s_out, energy), P.rank_for_energy(P.unfold_spectrum(conv.weight, 1), energy), s_out


@register_method("factorize.tucker", TuckerFactorizeConfig)
def _factorize_tucker(model: nn.Module, config: TuckerFactorizeConfig, session) -> nn.Module:
    """Tucker-2 decomposition of convolutions into 1x1 -> core -> 1x1 convolutions."""
    config.check_model(model)
    ranks, entries, no_gain = {}, {}, []
    for name, conv in config.select(model):
        r_out, r_in, s_out = _ranks(conv, config.rank)
        entries[name] = spectrum_entry(s_out)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        if r_in * conv.in_channels + r_in * r_out * k + r_out * conv.out_channels >= conv.weight.numel():
            no_gain.append(f"{name} (ranks {r_out}x{r_in} of {conv.out_channels}x{conv.in_channels})")
            continue
        core, u_out, u_in = P.tucker2(conv.weight, r_out, r_in, config.iterations)
        new = TuckerConv2d(**conv_geometry(conv), rank_in=r_in, rank_out=r_out)
        replace_module(model, name, put_factors(new, conv, {"first": u_in.T, "core": core, "last": u_out}))
        ranks[name] = [r_out, r_in]
    return finish(model, config, session, "factorize.tucker", ranks, entries, no_gain)
