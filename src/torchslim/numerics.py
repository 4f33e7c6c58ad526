"""Numerical faults caught and named: non-finite weights or outputs never pass as a result.

A model with NaN or inf weights computes NaN outputs, whose argmax is an arbitrary class: its
accuracy reads like a weak model's (about chance level) instead of a broken one's. The pipeline
checks the weights of the model it is given and after every step, and one forward pass on the
task's example inputs, and stops with the tensor or output named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UserError


class NumericalError(UserError):
    """Non-finite values (NaN, inf) in a model's weights or outputs."""


def nonfinite_tensors(model: nn.Module, limit: int = 5) -> list[tuple[str, int, int]]:
    """``(name, NaN count, inf count)`` of up to ``limit`` floating-point parameters and buffers
    (``state_dict`` entries) of ``model`` holding non-finite values; empty when all are finite.

    Examples
    --------
    >>> m = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     m.weight[0, 0] = float("nan")
    >>> nonfinite_tensors(m)
    [('weight', 1, 0)]
    """
    found = []
    for name, t in model.state_dict(keep_vars=False).items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.device.type == "meta":
            continue
        if t.dtype.itemsize == 1:   # fp8 storage: isfinite has no kernel for it
            t = t.float()
        if not bool(torch.isfinite(t).all()):
            found.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
            if len(found) >= limit:
                break
    return found


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Raise NumericalError naming the tensors of ``model`` that hold NaN or inf."""
    bad = nonfinite_tensors(model)
    if bad:
        listed = ", ".join(f"{n} ({nan} NaN, {inf} inf)" for n, nan, inf in bad)
        raise NumericalError(f"{what} has non-finite weights: {listed}; such a model computes NaN and no "
                             "figure measured on it means anything (check the weights file or the step)")


def _tensors(out: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for k, v in out.items() for t in _tensors(v, f"{prefix}[{k!r}]")]
    if isinstance(out, (list, tuple)):
        return [t for i, v in enumerate(out) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def check_finite_outputs(model: nn.Module, inputs: tuple | dict, what: str) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no gradients; its mode is restored) and raise
    NumericalError naming every floating-point output that holds NaN or inf."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    finally:
        model.train(was_training)
    bad = [(name, t) for name, t in _tensors(out) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(f"{n} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf of "
                           f"{t.numel()})" for n, t in bad[:5])
        raise NumericalError(f"{what} outputs non-finite values on the task's example inputs: {listed}")
