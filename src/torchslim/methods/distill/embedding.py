"""Embedding distillation: train a student to give the teacher's embeddings, without labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ModelRef, option
from ...errors import RecipeError
from ...registry import register_method
from ...train.config import TrainConfig
from ...train.plugins import LogitDistillation
from .logits import LogitsDistillConfig, train_student
from .primitives import EMBEDDING_LOSSES, embedding_loss


@dataclass(frozen=True)
class EmbeddingDistillConfig(LogitsDistillConfig):
    """Embedding distillation into a new student (Reimers & Gurevych 2020, eq. 1; Sanh et al.
    2019's cosine loss), the usual way to shrink a sentence encoder.

    The student is trained to give the teacher's outputs for the task's inputs: on ``stsb`` the
    mean-pooled sentence embeddings ``(N, 2, D)`` of both sentences of each pair (``2N``
    sentences a batch), on a classification task its logits. The loss is
    ``alpha * embedding_loss + (1 - alpha) * task loss`` (:func:`~.primitives.embedding_loss`:
    ``mse``, ``cosine`` = mean ``1 - cos``, or their sum); with ``alpha: 1`` (the default) the
    task loss is not computed, so the training split's labels are not used: only its inputs
    (STS-B's training sentences) are. Teacher and student must give embeddings of the same
    width (a student spec of another width is refused, naming both).

    ``teacher``: ``current`` (default), ``baseline`` or a spec; several weighted teachers are
    matched through the weighted mean of their embeddings. ``student``: a spec or ``{spec,
    weights, args}``, or ``{from_teacher: {layers: [0, 2, 4]}}`` (DistilBERT's initialisation:
    the teacher's layers 0, 2, 4 with their weights) or ``{from_teacher: {width: 0.5}}``
    (:mod:`~torchslim.methods.distill.students`). ``temperature`` is not used. ``cache: true``
    keeps the teachers' embeddings of the training split (fixed-length inputs only: a text
    task pads each batch to its longest sentence). Training fields go in ``train`` or beside the
    others.

    Examples
    --------
    >>> c = EmbeddingDistillConfig.from_dict({"student": {"from_teacher": {"layers": [0, 2, 4]}},
    ...                                       "loss": "cosine", "optimizer": "adamw", "lr": 2e-4})
    >>> c.student.layers, c.loss, c.alpha, c.train.lr
    ((0, 2, 4), 'cosine', 1.0, 0.0002)
    """

    alpha: float = option(1.0, low=0.0, high=1.0,
                          doc="weight of the embedding term; 1 - alpha on the task loss (1: labels not used)")
    loss: str = option("mse+cosine", choices=EMBEDDING_LOSSES,
                       doc="distance to the teacher's embeddings: mse, cosine (mean 1 - cos) or their sum")

    @classmethod
    def example(cls) -> "EmbeddingDistillConfig":
        return cls(student=ModelRef(spec="zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}),
                   loss="mse", train=TrainConfig(optimizer="adamw", epochs=2, loggers=()))

    def check_task(self, task) -> None:
        """Any task's outputs can be matched; a cache needs inputs of one length."""
        if self.cache and getattr(task, "variable_length", False):
            raise RecipeError(f"distill.embedding.cache: task {task.spec!r} pads each batch to its longest "
                              "input, so cached embeddings cannot be matched to batches; set cache: false")

    def check_pair(self, teacher: nn.Module | None, student: nn.Module, task: Any) -> None:
        """Teacher and student built at preflight must give embeddings of one width."""
        if teacher is None or task is None or getattr(task, "metric_name", None) is None:
            return
        ds = task.split("train")
        batch = task.collate([ds[i] for i in range(min(2, len(ds)))])
        with torch.no_grad():
            t, s = task.forward(teacher.eval(), batch), task.forward(student.eval(), batch)
        check_widths(s, t)

    def plugins(self, teacher, cache_dir) -> list:
        models, weights = zip(*((teacher(ref), w) for ref, w in self.teachers()))
        return [EmbeddingDistillation(list(models), self.loss, self.alpha, weights=list(weights),
                                      cache=self.cache, cache_dir=cache_dir)]


def check_widths(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """RecipeError naming both shapes unless the student's outputs have the teacher's."""
    if student.shape != teacher.shape:
        raise RecipeError(f"distill.embedding: the student's embeddings are {tuple(student.shape)} (width "
                          f"{student.shape[-1]}) but the teacher's are {tuple(teacher.shape)} (width "
                          f"{teacher.shape[-1]}); give a student of the teacher's width, e.g. "
                          "{from_teacher: {layers: [...]}}")


class EmbeddingDistillation(LogitDistillation):
    """Embedding distillation as a loss term: ``alpha * embedding_loss(student, teacher) +
    (1 - alpha) * loss`` on the task's outputs (``task.forward``: sentence embeddings on
    ``stsb``, ``(N, 2, D)``). With several teachers the target is the weighted mean of their
    outputs. Teachers, weights and the cache are handled as in
    :class:`~torchslim.train.plugins.LogitDistillation` (frozen, eval mode, ``no_grad``).

    Parameters
    ----------
    teacher : nn.Module or list of nn.Module
        Frozen; moved to the student's device at setup.
    kind : str
        ``mse``, ``cosine`` or ``mse+cosine`` (:func:`~.primitives.embedding_loss`).
    alpha : float
        Weight of the embedding term in [0, 1]; the trainer's ``loss`` gets ``1 - alpha``.
    weights, cache, cache_dir
        As for :class:`~torchslim.train.plugins.LogitDistillation`.

    Raises
    ------
    RecipeError
        When the student's and a teacher's outputs differ in shape (both named).
    """

    def __init__(self, teacher: nn.Module | list[nn.Module], kind: str = "mse", alpha: float = 1.0, *,
                 weights: list[float] | None = None, cache: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__(teacher, temperature=1.0, alpha=alpha, weights=weights, cache=cache, cache_dir=cache_dir)
        if kind not in EMBEDDING_LOSSES:
            raise ValueError(f"EmbeddingDistillation kind {kind!r}: accepted {', '.join(EMBEDDING_LOSSES)}")
        self.kind = kind

    def term(self, outputs: torch.Tensor, teacher_outputs: list[torch.Tensor]) -> torch.Tensor:
        total = sum(self.weights)
        target = sum(w / total * t for w, t in zip(self.weights, teacher_outputs))   # same shape as outputs
        return embedding_loss(outputs, target, self.kind)


def _no_task_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The trainer's loss before the plugins when ``alpha`` is 1: zero, so no label is used."""
    return next(model.parameters()).new_zeros(())


@register_method("distill.embedding", EmbeddingDistillConfig)
def _distill_embedding(model: nn.Module, config: EmbeddingDistillConfig, ctx) -> nn.Module:
    """Train a new student (a spec or a copy of the teacher with fewer layers) on the teacher's embeddings."""
    ctx.require_task("distill")
    return train_student(model, config, ctx, loss_fn=_no_task_loss if config.alpha >= 1.0 else None)
