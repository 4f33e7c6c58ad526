"""Logit distillation: train a student to match the teacher's softened outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...config import as_mapping, option
from ...errors import RecipeError
from ...registry import register_method
from ...specs.models import build_model
from ...train.config import TrainConfig
from .primitives import kd_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitsDistillConfig(TrainConfig):
    """Knowledge distillation on logits; also takes every training field (epochs, lr, ...).

    ``teacher``: a model spec, or null for the recipe's current model. ``student``: a spec
    string or ``{spec, args, weights}``.

    Examples
    --------
    >>> c = LogitsDistillConfig(student={"spec": "zoo:digits-cnn", "args": {"channels": [8, 16]}})
    >>> c.temperature, c.alpha
    (4.0, 0.9)
    """

    teacher: str | None = option(None, doc="teacher spec (null: the current model)")
    teacher_weights: str | None = option(None, doc="weights file for a teacher spec")
    student: str | dict | None = option(None, doc="student spec string or {spec, args, weights}")
    temperature: float = option(4.0, low=0.0, low_open=True, doc="softmax temperature T")
    alpha: float = option(0.9, low=0.0, high=1.0, doc="weight of the soft (KL) term; 1 - alpha on CE")

    @classmethod
    def example(cls) -> "LogitsDistillConfig":
        return cls(student={"spec": "zoo:digits-cnn", "args": {"channels": [8, 16], "hidden": 32}},
                   epochs=2, loggers=())

    def check_ready(self, task=None) -> None:
        """Build the student (and a named teacher) now, so a bad spec fails before any work."""
        from ...measure import check_runs

        super().check_ready(task)
        if task is not None and getattr(task, "outputs", "logits") != "logits":
            raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class "
                              "logits; logit distillation needs a classification task")
        s = self.student
        student = build_model(s["spec"], weights=s.get("weights"), args=s.get("args") or {})
        check_runs(student, task, f"student {s['spec']}")
        if self.teacher is not None:
            check_runs(build_model(self.teacher, weights=self.teacher_weights), task, f"teacher {self.teacher}")

    @classmethod
    def from_dict(cls, data, where: str = ""):
        data = as_mapping(data, where or cls.__name__)
        if isinstance(data.get("student"), str):
            data["student"] = {"spec": data["student"]}
        return super().from_dict(data, where=where)

    def validate(self) -> None:
        super().validate()
        s = self.student
        if s is None:
            raise RecipeError("LogitsDistillConfig.student: missing; give a spec such as zoo:digits-cnn "
                              "or {spec: ..., args: {...}}")
        if isinstance(s, str):
            object.__setattr__(self, "student", {"spec": s})
            s = self.student
        unknown = set(s) - {"spec", "args", "weights"}
        if "from_teacher" in s:
            raise RecipeError("LogitsDistillConfig.student: from_teacher (layer reduction) is not available "
                              "in this version; give a student spec")
        if unknown or "spec" not in s:
            raise RecipeError(f"LogitsDistillConfig.student: expected keys spec, args, weights; got {sorted(s)}")


@register_method("distill.logits", LogitsDistillConfig)
def _distill_logits(model: nn.Module, config: LogitsDistillConfig, ctx) -> nn.Module:
    """Hinton KD: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE into a new student."""
    task = ctx.require_task("distill")
    if task.outputs != "logits":
        raise RecipeError(f"distill.logits: task {task.spec!r} produces {task.outputs}, not class logits; "
                          "logit distillation needs a classification task")
    teacher = model if config.teacher is None else build_model(config.teacher, weights=config.teacher_weights)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s = config.student
    torch.manual_seed(config.seed)  # reproducible student init
    student = build_model(s["spec"], weights=s.get("weights"), args=s.get("args") or {})

    def loss_fn(st: nn.Module, batch) -> torch.Tensor:
        with torch.no_grad():
            t_out = task.forward(teacher, batch)
        s_out = task.forward(st, batch)
        if s_out.shape != t_out.shape:
            raise RecipeError(f"distill: student outputs {tuple(s_out.shape)} but the teacher outputs "
                              f"{tuple(t_out.shape)}; they must match")
        return kd_loss(s_out, t_out, task.targets(batch), config.temperature, config.alpha,
                       config.label_smoothing)

    train_cfg = TrainConfig.from_dict({k: v for k, v in config.to_dict().items()
                                       if k in TrainConfig.__dataclass_fields__})
    ctx.train(student, train_cfg, desc="distill", loss_fn=loss_fn)
    return student
