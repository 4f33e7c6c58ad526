"""Logit distillation: train a new student to match the teacher's softened outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn

from ...config import MethodConfig, ModelRef, as_mapping, option
from ...errors import RecipeError
from ...registry import register_method
from ...train.config import TEACHER_ROLES, TrainConfig, teacher_ref
from ...train.plugins import LogitDistillation

log = logging.getLogger(__name__)

_TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


@dataclass(frozen=True)
class LogitsDistillConfig(MethodConfig):
    """Knowledge distillation on logits into a new student (Hinton et al. 2015, eq. 2).

    The student is trained with ``alpha * T^2 * KL(p_T^teacher || p_T^student) + (1 - alpha) * CE``
    by the shared trainer and the :class:`~torchslim.train.plugins.LogitDistillation` plugin
    (the same plugin that ``finetune: {distill: ...}`` adds to any fine-tuning).

    ``teacher``: ``current`` (the model entering the step, default), ``baseline``, or a model
    spec / ``{spec, weights, args}``. ``student``: a model spec or ``{spec, weights, args}``.
    ``train``: the training run; training fields given beside the others (``epochs: 8``) are
    read into it, as earlier versions wrote them.

    Examples
    --------
    >>> c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 3})
    >>> c.student.spec, c.train.epochs, c.temperature, c.alpha
    ('zoo:digits-cnn', 3, 4.0, 0.9)
    """

    REPLACES_MODEL = True

    teacher: str | ModelRef = option("current", doc="current, baseline, or a model spec / {spec, weights, args}")
    student: ModelRef | None = option(None, doc="student spec or {spec, args, weights} (required)")
    temperature: float = option(4.0, low=0.0, low_open=True, doc="softmax temperature T")
    alpha: float = option(0.9, low=0.0, high=1.0, doc="weight of the soft (KL) term; 1 - alpha on CE")
    train: TrainConfig = option(default_factory=TrainConfig, doc="the student's training run")

    @classmethod
    def example(cls) -> "LogitsDistillConfig":
        return cls(student=ModelRef(spec="zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}),
                   train=TrainConfig(epochs=2, loggers=()))

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """Training fields beside the others go into ``train``; ``teacher_weights`` into ``teacher``."""
        data = as_mapping(data, where or cls.__name__)
        flat = {k: data.pop(k) for k in list(data) if k in _TRAIN_KEYS and k != "distill"}
        if flat:
            train = as_mapping(data.get("train"), f"{where or cls.__name__}.train")
            clash = sorted(set(flat) & set(train))
            if clash:
                raise RecipeError(f"{where or cls.__name__}: {clash[0]!r} given both beside the fields and "
                                  "in train:; give it once")
            data["train"] = {**train, **flat}
        if "teacher_weights" in data:
            weights = data.pop("teacher_weights")
            teacher = data.get("teacher")
            if weights is not None:
                if not isinstance(teacher, str) or teacher in TEACHER_ROLES:
                    raise RecipeError(f"{where or cls.__name__}.teacher_weights: needs a teacher spec string; "
                                      "or give teacher: {spec: ..., weights: ...}")
                data["teacher"] = {"spec": teacher, "weights": weights}
        return super().from_dict(data, where=where)

    def validate(self) -> None:
        if self.student is None:
            raise RecipeError("LogitsDistillConfig.student: missing; give a spec such as zoo:digits-cnn "
                              "or {spec: ..., args: {...}}")
        object.__setattr__(self, "teacher", teacher_ref(self.teacher, "LogitsDistillConfig.teacher"))
        if self.train.distill is not None:
            raise RecipeError("LogitsDistillConfig.train.distill: this step distills already; set teacher, "
                              "temperature and alpha on the step")

    def check_ready(self, task=None) -> None:
        """Build the student (and a named teacher) now, so a bad spec fails before any work."""
        from ...errors import SpecError
        from ...measure import check_runs

        super().check_ready(task)
        if task is not None and getattr(task, "outputs", "logits") != "logits":
            raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class "
                              "logits; logit distillation needs a classification task")
        for role, ref in (("student", self.student), ("teacher", self.teacher)):
            if isinstance(ref, ModelRef):
                try:
                    model = ref.build()
                except SpecError as exc:
                    raise SpecError(f"{role}: {exc}") from None
                check_runs(model, task, f"{role} {ref.spec}")


@register_method("distill.logits", LogitsDistillConfig)
def _distill_logits(model: nn.Module, config: LogitsDistillConfig, ctx) -> nn.Module:
    """Hinton KD: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE into a new student."""
    task = ctx.require_task("distill")
    if task.outputs != "logits":
        raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class logits; "
                          "logit distillation needs a classification task")
    teacher = model if config.teacher == "current" else ctx.teacher(config.teacher)
    torch.manual_seed(config.train.seed)  # reproducible student init
    student = config.student.build()
    plugin = LogitDistillation(teacher, config.temperature, config.alpha)
    ctx.train(student, config.train, desc="distill", plugins=[plugin])
    return student
