"""Counting weights: ``params`` and ``nonzero_params`` of a model (see :mod:`torchslim.layers`)."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module, recurse: bool = True) -> tuple[int, int]:
    """``(params, nonzero_params)`` of ``model``: logical weights, tied tensors counted once;
    ``recurse=False``: the module's own weights only, not its children's.

    A module with ``slim_weights()`` declares its own tensors by attribute name (quantized codes
    count as the weights they encode; a code equal to its zero point is a zero); every other
    module counts its parameters. Buffers are not weights (BatchNorm statistics, BERT's
    ``position_ids``). A tensor held by several modules (tied) counts once.

    Examples
    --------
    >>> lin = nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = lin.weight.zero_()
    >>> count_params(lin)
    (10, 2)
    """
    total = nonzero = 0
    seen: set[int] = set()
    for module in (model.modules() if recurse else [model]):
        declared = module.slim_weights() if hasattr(module, "slim_weights") else None
        if declared is not None:
            for attr, (numel, nnz) in declared.items():
                key = id(getattr(module, attr, None) if hasattr(module, attr) else (module, attr))
                if key in seen:
                    continue
                seen.add(key)
                total += numel
                nonzero += nnz
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:       # tied weights count once
                continue
            seen.add(id(p))
            total += p.numel()
            nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero
