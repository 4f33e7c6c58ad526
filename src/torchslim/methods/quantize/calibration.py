"""What the calibrated quantization methods share: the ``calibration:`` block, the data check at
preflight, and the token rows of a batch that are not padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...config import MethodConfig, option
from ...errors import RecipeError, UserError


@dataclass(frozen=True)
class CalibrationConfig(MethodConfig):
    """Calibration examples: ``samples`` drawn from the task's training split (seed 0, the same
    on every rank), run in batches of ``batch_size``.

    Examples
    --------
    >>> CalibrationConfig(samples=64).batch_size
    32
    """

    samples: int = option(128, low=1, doc="calibration examples from the training split")
    batch_size: int = option(32, low=1, doc="examples per calibration forward pass")


def smooth_option() -> Any:
    """The ``smooth:`` field of a calibrated method (CONTRACT: SmoothQuant alpha, null off)."""
    return option(None, low=0.0, high=1.0, doc="SmoothQuant alpha: fold per-channel activation scales into the "
                                              "Linear weights first, from calibration data (null: off)")


def calibration_option() -> Any:
    """The ``calibration:`` field of a calibrated method."""
    return option(default_factory=CalibrationConfig, doc="calibration examples: {samples, batch_size}")


def require_data(task: Any, what: str, why: str) -> None:
    """RecipeError when ``task`` has no training examples (a ``shape:`` task: random inputs only);
    nothing is checked without a task (the session refuses then)."""
    if task is None:
        return
    try:
        task.split("train")
    except UserError:
        raise RecipeError(f"{what}: {why} needs calibration data, and task {task.spec!r} has none (random inputs "
                          "only); use a task with data (digits, mnist, stsb, ...)") from None


def token_rows(task: Any, batch: Any, x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (a layer's input, ``(..., features)``) as ``(n, features)``, without the
    padding positions of a token task: when the task names an ``attention_mask`` input whose
    elements match ``x``'s leading dimensions, rows where it is 0 are dropped (their hidden
    states are computed but never used, and would skew calibration statistics)."""
    rows = x.reshape(-1, x.shape[-1])
    names = tuple(getattr(task, "input_names", ()) or ())
    if "attention_mask" not in names or not isinstance(batch, (tuple, list)):
        return rows
    mask = batch[names.index("attention_mask")]
    if not isinstance(mask, torch.Tensor) or mask.numel() != rows.shape[0]:
        return rows
    return rows[mask.reshape(-1).to(rows.device) != 0]


def calibration_batches(session: Any, calibration: CalibrationConfig, what: str, why: str) -> list:
    """The session's calibration batches as ``calibration`` asks, after :func:`require_data` on
    its task (a handler applied without a preflight, ``torchslim.apply``, is refused the same)."""
    require_data(session.require_task(what), what, why)
    return session.calibration_batches(calibration.samples, batch_size=calibration.batch_size)
