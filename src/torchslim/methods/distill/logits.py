"""Logit distillation: train a new student to match the teacher's softened outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ...config import MethodConfig, ModelRef, as_mapping, option
from ...errors import RecipeError
from ...registry import register_method
from ...train.config import (TEACHER_ROLES, TrainConfig, WeightedTeacher, build_checked, known_teachers,
                             teachers_ref, weighted_teachers)
from ...train.distill import check_distill, distill_plugins
from .students import FromTeacher, build_student, check_layers, student_preflight, student_ref

log = logging.getLogger(__name__)

_TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


@dataclass(frozen=True)
class LogitsDistillConfig(MethodConfig):
    """Knowledge distillation on logits into a new student (Hinton et al. 2015, eq. 2).

    The student is trained with ``alpha * T^2 * KL(p_T^teacher || p_T^student) + (1 - alpha) * CE``
    by the shared trainer and the :class:`~torchslim.train.plugins.LogitDistillation` plugin
    (the same plugin that ``finetune: {distill: ...}`` adds to any fine-tuning).

    ``teacher``: ``current`` (the model entering the step, default), ``baseline``, or a model
    spec / ``{spec, weights, args}``; or several, ``[{model: ..., weight: 0.7}, ...]``, whose
    softened distributions are averaged with those weights. ``student``: a model spec or
    ``{spec, weights, args}``, or a smaller copy of the (one) teacher, ``{from_teacher: {layers:
    [0, 2, 4]}}`` / ``{from_teacher: {width: 0.5}}`` (:mod:`~torchslim.methods.distill.students`:
    DistilBERT's initialisation keeps every other layer). ``cache: true`` computes the teachers' logits of the training
    split once (kept in the step's scratch directory) instead of running the teachers on every
    batch; only for training data without augmentation.
    ``train``: the training run; training fields given beside the others (``epochs: 8``) are
    read into it, as earlier versions wrote them. At a high ``T`` the soft term approaches a
    squared error between the logits (Hinton et al. 2015, sec. 2.1) whose gradient grows with the
    teacher's logit range, far above cross-entropy's at the start: give such runs a warm-up
    (``train: {warmup: 1}``). On MNIST at T = 20 and SGD lr 0.05 the student without one diverged
    or ended worse than trained alone (BENCHMARKS.md, "Hinton et al. 2015 on MNIST").

    Examples
    --------
    >>> c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 3})
    >>> c.student.spec, c.train.epochs, c.temperature, c.alpha
    ('zoo:digits-cnn', 3, 4.0, 0.9)
    """

    REPLACES_MODEL = True

    teacher: str | ModelRef | tuple[WeightedTeacher, ...] = option(
        "current", doc="current, baseline, or a model spec / {spec, weights, args}; or a list of {model, weight}")
    student: ModelRef | FromTeacher | None = option(
        None, doc="student spec or {spec, args, weights}, or {from_teacher: {layers: [0, 2, 4]}} / "
                  "{from_teacher: {width: 0.5}} (required)")
    temperature: float = option(4.0, low=0.0, low_open=True, doc="softmax temperature T")
    alpha: float = option(0.9, low=0.0, high=1.0, doc="weight of the soft (KL) term; 1 - alpha on CE")
    train: TrainConfig = option(default_factory=TrainConfig, doc="the student's training run")
    cache: bool = option(False, doc="cache the teachers' logits of the training split on disk (training "
                                    "data without augmentation only)")

    def __post_init__(self) -> None:
        # {from_teacher: ...} is not a ModelRef's mapping: read before the fields are coerced
        object.__setattr__(self, "student", student_ref(self.student, f"{type(self).__name__}.student"))
        super().__post_init__()

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
        if "student" in data:
            data["student"] = student_ref(data["student"], f"{where or cls.__name__}.student")
        return super().from_dict(data, where=where)

    def validate(self) -> None:
        if self.student is None:
            raise RecipeError(f"{type(self).__name__}.student: missing; give a spec such as zoo:digits-cnn, "
                              "{spec: ..., args: {...}} or {from_teacher: {layers: [0, 2, 4]}}")
        object.__setattr__(self, "teacher", teachers_ref(self.teacher, f"{type(self).__name__}.teacher"))
        if isinstance(self.student, FromTeacher) and len(self.teachers()) > 1:
            raise RecipeError(f"{type(self).__name__}.student: from_teacher copies one teacher, and "
                              f"{len(self.teachers())} are given; give one teacher or a student spec")
        if self.cache and self.train.jitter:
            raise RecipeError(f"{type(self).__name__}.cache: cached teacher logits need the training images as "
                              f"they are, and train.jitter: {self.train.jitter} shifts them; set cache: false")
        if self.train.distill is not None:
            raise RecipeError("LogitsDistillConfig.train.distill: this step distills already; set teacher, "
                              "temperature and alpha on the step")

    def check_ready(self, task=None) -> None:
        """Build the student (and a named teacher) now, so a bad spec or layer index fails before
        any work."""
        super().check_ready(task)
        self.check_task(task)
        self.check_models([build_checked(ref, task, "teacher") if isinstance(ref, ModelRef) else None
                           for ref, _ in self.teachers()], task)

    def check_teachers(self, roles: dict[str, Any], model: nn.Module | None, task: Any = None,
                       shapes: bool = True) -> None:
        """With a teacher given by a role preflight knows (``baseline``; ``current`` while the
        model entering the step is known), the checks of :meth:`check_ready` on that model as
        built; teachers given by spec alone were checked there."""
        if any(isinstance(ref, str) and ref in roles for ref, _ in self.teachers()):
            self.check_models(known_teachers(self.teachers(), roles, task), task)

    def check_models(self, teachers: list[nn.Module | None], task: Any) -> None:
        """Checks on the teachers preflight knows (None where unknown) and on the student built
        from them: layer names, ``from_teacher`` indices, the pair (:meth:`check_pair`), output
        shapes and the plugins' setup (:func:`~torchslim.train.distill.check_distill`)."""
        for teacher in teachers:
            if teacher is not None:
                self.check_layers("teacher", teacher)
        teacher = teachers[0] if len(teachers) == 1 else None
        student = student_preflight(self.student, teacher, task)
        if student is not None:
            self.check_layers("student", student)
            self.check_pair(teacher, student, task)
            if task is not None:
                check_distill(self, teachers, student, task)

    def check_task(self, task) -> None:
        """RecipeError when the logit term (``alpha > 0``) meets a task without class logits."""
        if self.alpha > 0 and task is not None and getattr(task, "outputs", "logits") != "logits":
            raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class "
                              "logits; logit distillation needs a classification task")

    def check_pair(self, teacher: nn.Module | None, student: nn.Module, task) -> None:
        """Preflight on the student and the teacher as built (the teacher None when given by
        role); distillation methods with more to compare override it."""

    def check_model(self, model: nn.Module) -> None:
        """With ``teacher: current``, ``from_teacher.layers`` are checked against ``model``."""
        if self.teacher == "current" and isinstance(self.student, FromTeacher):
            check_layers(self.student, model)

    def plugins(self, teacher, cache_dir) -> list:
        """The training plugins of this step (:func:`~torchslim.train.distill.distill_plugins`);
        ``teacher(ref)`` gives the model of a teacher reference."""
        return distill_plugins(self, teacher, cache_dir)

    def teachers(self) -> tuple[tuple[str | ModelRef, float], ...]:
        """``((teacher, weight), ...)``: the one teacher with weight 1, or the weighted list."""
        return weighted_teachers(self.teacher)

    def check_layers(self, role: str, model: nn.Module) -> None:
        """Raise a RecipeError when layers this config names do not exist in the built ``role``
        model (``student`` or ``teacher``); feature distillation configs check theirs."""


@register_method("distill.logits", LogitsDistillConfig)
def _distill_logits(model: nn.Module, config: LogitsDistillConfig, ctx) -> nn.Module:
    """Hinton KD: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE into a new student."""
    task = ctx.require_task("distill")
    if task.outputs != "logits":
        raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class logits; "
                          "logit distillation needs a classification task")
    return train_student(model, config, ctx)


def train_student(model: nn.Module, config: LogitsDistillConfig, ctx, loss_fn=None) -> nn.Module:
    """Build the teachers and the student (a spec, or a copy of the one teacher) and train it with
    the plugins ``config`` asks for (the teacher ``current`` is ``model`` itself); ``loss_fn``
    replaces the task loss (:class:`~torchslim.train.trainer.Trainer`)."""
    refs = [ref for ref, _ in config.teachers()]
    teachers = [model if ref == "current" else ctx.teacher(ref) for ref in refs]
    torch.manual_seed(config.train.seed)  # reproducible student init
    student = build_student(config.student, teachers[0], ctx)
    plugins = config.plugins(lambda ref: teachers[refs.index(ref)], ctx.distill_cache_dir())
    ctx.train(student, config.train, desc="distill", plugins=plugins, loss_fn=loss_fn)
    return student
