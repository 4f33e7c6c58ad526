"""``factorize: {method: svd}``: each Linear as two thinner Linears (truncated SVD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import option
from ...edits import replace_module
from ...errors import RecipeError
from ...layers import LowRankLinear
from ...registry import register_method
from . import primitives as P
from .base import FactorizeConfig, finish, spectrum_entry

DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class SVDFactorizeConfig(FactorizeConfig):
    """Replace each targeted ``nn.Linear`` (W [out, in]) by its best rank-r approximation
    ``U_r S_r V_r^T`` (Eckart & Young 1936; Denton et al. 2014) as a ``LowRankLinear``
    (in -> r -> out, two Linears): ``r * (in + out)`` weights instead of ``in * out``.

    ``rank``: an integer r per layer (at most min(out, in): a larger one is an error naming the
    layer and its largest rank), or a fraction in (0, 1): per layer, the smallest r keeping that
    fraction of the spectral energy ``sum s_i^2`` (default 0.9). ``budget`` instead chooses the
    ranks of all targeted layers together: the factors hold at most that fraction of the targeted
    layers' weights, and singular values go where they keep the most (normalized) energy per
    weight. A layer whose rank would not make it smaller is left dense, with a ``no_gain``
    warning in the step's row. The step's metrics row gets ``ranks`` and ``spectra`` (the first
    256 singular values of each layer, divided by the largest). Linears tied to each other share
    their factors. ``nn.MultiheadAttention``'s ``out_proj`` (read as a tensor by the attention)
    is passed over, as are the Linears of ``nn.TransformerEncoderLayer``/``DecoderLayer`` (their fast
    path reads the weights); a Hugging Face model's Linears are all called, so all factorizable.

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> small = torchslim.apply(m, SVDFactorizeConfig(rank=32, ignore=("5",)))  # 5: 100 -> 10, max rank 10
    >>> type(small[1]).__name__, small[1].rank
    ('LowRankLinear', 32)
    """

    budget: float | None = option(None, low=0.0, high=1.0, low_open=True, high_open=True,
                                  doc="instead of rank: fraction of the targeted layers' weights kept, ranks "
                                      "chosen across layers")

    def validate(self) -> None:
        super().validate()
        if self.budget is not None and self.rank is not None:
            raise RecipeError("SVDFactorizeConfig.budget: give either rank (per layer) or budget (global), "
                              "not both")

    def max_rank(self, module: nn.Module) -> int:
        return min(module.in_features, module.out_features)

    @classmethod
    def example(cls) -> "SVDFactorizeConfig":
        return cls(rank=4)


def _low_rank(linear: nn.Linear, rank: int, tied: LowRankLinear | None) -> LowRankLinear:
    w = linear.weight
    new = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    new = new.to(device=w.device, dtype=w.dtype).train(linear.training)
    if tied is not None:             # the same float weight: the same factors, stored once
        new.first.weight, new.second.weight = tied.first.weight, tied.second.weight
    else:
        first, second, _ = P.low_rank_factors(w, rank)
        with torch.no_grad():
            new.first.weight.copy_(first)
            new.second.weight.copy_(second)
    if linear.bias is not None:
        with torch.no_grad():
            new.second.bias.copy_(linear.bias)
    return new


@register_method("factorize.svd", SVDFactorizeConfig)
def _factorize_svd(model: nn.Module, config: SVDFactorizeConfig, session) -> nn.Module:
    """Truncated SVD of Linear layers into two thinner Linears."""
    config.check_model(model)
    chosen = config.select(model)
    spectra = {}                                          # id(weight) -> singular values (descending)
    for _, m in chosen:
        if id(m.weight) not in spectra:
            spectra[id(m.weight)] = torch.linalg.svdvals(m.weight.detach().double())
    if config.budget is not None:
        unique = {id(m.weight): m for _, m in chosen}
        costs = {k: m.in_features + m.out_features for k, m in unique.items()}
        total = sum(m.in_features * m.out_features for m in unique.values())
        ranks_by_weight = P.ranks_for_budget(spectra, costs, int(config.budget * total))
    else:
        ranks_by_weight = {k: config.rank if isinstance(config.rank, int)
                           else P.rank_for_energy(s, config.rank or DEFAULT_ENERGY) for k, s in spectra.items()}
    done: dict[int, LowRankLinear] = {}
    ranks, entries, no_gain = {}, {}, []
    for name, m in chosen:
        r = ranks_by_weight[id(m.weight)]
        entries[name] = spectrum_entry(spectra[id(m.weight)])
        if r * (m.in_features + m.out_features) >= m.in_features * m.out_features:
            no_gain.append(f"{name} (rank {r} of {m.in_features}->{m.out_features})")
            continue
        new = _low_rank(m, r, done.get(id(m.weight)))
        done.setdefault(id(m.weight), new)
        replace_module(model, name, new)
        ranks[name] = r
    return finish(model, config, session, "factorize.svd", ranks, entries, no_gain)
