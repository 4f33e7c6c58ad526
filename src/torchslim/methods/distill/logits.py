"""Logit distillation: train a new student to match the teacher's softened outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ...config import ModelRef, option
from ...errors import RecipeError
from ...registry import register_method
from ...train.config import TrainConfig
from ...train.plugins import LogitDistillation
from .students import DistillStepConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitsDistillConfig(DistillStepConfig):
    """Knowledge distillation on logits into a new student (Hinton et al. 2015, eq. 2).

    The student is trained with ``alpha * T^2 * KL(p_T^teacher || p_T^student) + (1 - alpha) * CE``
    by the shared trainer and the :class:`~torchslim.train.plugins.LogitDistillation` plugin
    (the same plugin that ``finetune: {distill: ...}`` adds to any fine-tuning).

    ``teacher``: ``current`` (the model entering the step, default), ``baseline``, or a model
    spec / ``{spec, weights, args}``. ``student``: a model spec or ``{spec, weights, args}``, or
    ``{from_teacher: {layers: [...]}}`` / ``{from_teacher: {width: 0.5}}`` (a smaller copy of
    the teacher, :mod:`~torchslim.methods.distill.students`). ``train``: the training run;
    training fields given beside the others (``epochs: 8``) are read into it, as earlier versions
    wrote them.

    Examples
    --------
    >>> c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 3})
    >>> c.student.spec, c.train.epochs, c.temperature, c.alpha
    ('zoo:digits-cnn', 3, 4.0, 0.9)
    """

    temperature: float = option(4.0, low=0.0, low_open=True, doc="softmax temperature T")
    alpha: float = option(0.9, low=0.0, high=1.0, doc="weight of the soft (KL) term; 1 - alpha on CE")

    @classmethod
    def example(cls) -> "LogitsDistillConfig":
        return cls(student=ModelRef(spec="zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}),
                   train=TrainConfig(epochs=2, loggers=()))

    def check_ready(self, task=None) -> None:
        """The task must give class logits; then the students' and teachers' checks."""
        if task is not None and getattr(task, "outputs", "logits") != "logits":
            raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class "
                              "logits; logit distillation needs a classification task")
        super().check_ready(task)


@register_method("distill.logits", LogitsDistillConfig)
def _distill_logits(model: nn.Module, config: LogitsDistillConfig, ctx) -> nn.Module:
    """Hinton KD: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE into a new student."""
    task = ctx.require_task("distill")
    if task.outputs != "logits":
        raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class logits; "
                          "logit distillation needs a classification task")
    teacher, student = config.teacher_and_student(model, ctx)
    plugin = LogitDistillation(teacher, config.temperature, config.alpha)
    ctx.train(student, config.train, desc="distill", plugins=[plugin])
    return student
