"""Training plugins: how methods extend the one trainer instead of writing loops of their own.

A plugin may add loss terms, add trainable parameters (a hint projection trained with the
student), act after each optimizer step (pruning masks, gradual schedules), and keep state that
is saved with every epoch checkpoint, so a resumed run continues exactly. Pruning masks,
gradual schedules and the distillation teacher are plugins, so "prune while distilling" is a
recipe (``finetune: {distill: {teacher: baseline}}``), not new code.

The trainer calls, in order: :meth:`TrainingPlugin.setup` once; then per batch
``loss = plugin.loss(model, batch, outputs, loss)`` for each plugin in list order, backward,
the optimizer step, and :meth:`TrainingPlugin.after_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class TrainingPlugin:
    """Base class of training plugins; every hook is optional.

    Thread/process model: one instance per process; under torchrun each rank has its own and the
    trainer averages the gradients of :meth:`parameters` over ranks like DDP does for the model's.
    """

    def setup(self, trainer: Any) -> None:
        """Called once before the first batch (``trainer.model``, ``trainer.task`` are set)."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters, optimized with the model's (default none). Their values
        belong in :meth:`state_dict` too, so a resumed run continues with them (the optimizer's
        state for them is checkpointed by the trainer)."""
        return []

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        """The new training loss given the loss so far (default: unchanged).

        ``outputs`` is the model's output on ``batch`` (``task.forward``), or None when the
        trainer was given a custom ``loss_fn``; ``model`` may be the DDP wrapper.
        """
        return loss

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step with the bare model and the 1-based step count."""

    def state_dict(self) -> dict[str, Any] | None:
        """State to checkpoint with each epoch (tensors and plain containers only), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class CallbackPlugin(TrainingPlugin):
    """A plain ``fn(model, step, total_steps)`` called after each step, as a plugin."""

    def __init__(self, fn: Callable[[nn.Module, int, int], None]) -> None:
        self.fn = fn

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.fn(model, step, total_steps)

    def state_dict(self) -> dict[str, Any] | None:
        return self.fn.state_dict() if hasattr(self.fn, "state_dict") else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state)


class LogitDistillation(TrainingPlugin):
    """Knowledge distillation on logits as a loss term (Hinton et al. 2015, eq. 2).

    The new loss is ``alpha * T^2 * KL(p_T^teacher || p_T^student) + (1 - alpha) * loss`` where
    ``loss`` is the task loss so far (cross-entropy with the configured label smoothing). The
    teacher runs in eval mode under ``no_grad`` and is never changed.

    Parameters
    ----------
    teacher : nn.Module
        Frozen; moved to the student's device at setup.
    temperature : float
        ``T > 0``; softens both distributions.
    alpha : float
        Weight of the soft term in [0, 1].

    Raises
    ------
    RecipeError
        When the student's and teacher's outputs differ in shape (named in the message).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.task: Any = None

    def setup(self, trainer: Any) -> None:
        from ..specs.tasks import _device_of

        self.task = trainer.task
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.to(_device_of(trainer.model))

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        if outputs is None:
            outputs = self.task.forward(model, batch)
        with torch.no_grad():
            t_out = self.task.forward(self.teacher, batch)
        soft = self.term(outputs, t_out)
        return soft if self.alpha >= 1.0 else self.alpha * soft + (1.0 - self.alpha) * loss

    def term(self, outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> torch.Tensor:
        """The distillation term of the student's and teacher's outputs on one batch (a subclass
        may compare them otherwise: embedding distillation)."""
        from ..errors import RecipeError
        from ..methods.distill.primitives import kd_loss  # pure tensor math

        if outputs.shape != teacher_outputs.shape:
            raise RecipeError(f"distill: the student outputs {tuple(outputs.shape)} but the teacher outputs "
                              f"{tuple(teacher_outputs.shape)}; they must match")
        return kd_loss(outputs, teacher_outputs, None, self.temperature, 1.0)
