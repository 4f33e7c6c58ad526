"""Hint distillation: a new student trained to reproduce named teacher layers (FitNets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...config import ModelRef, option
from ...errors import RecipeError
from ...modules import find_module
from ...registry import register_method
from ...train.config import HintTerm, TrainConfig
from .logits import LogitsDistillConfig, train_student


@dataclass(frozen=True)
class LayerPairsDistillConfig(LogitsDistillConfig):
    """The fields and checks shared by distillation from named layer pairs (hints, attention):
    ``layers: {student layer: teacher layer}``, one teacher, ``alpha`` off by default. Subclasses
    give :meth:`term` (the DistillTerm part their plugin is built from)."""

    alpha: float = option(0.0, low=0.0, high=1.0, doc="weight of the logit (KL) term; 0: the layer loss "
                                                      "and the task loss only")
    layers: dict[str, str] = option(default_factory=dict, doc="student layer name -> teacher layer name (required)")

    def term(self) -> Any:
        raise NotImplementedError

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not self.layers:
            raise RecipeError(f"{name}.layers: missing; give student layer -> teacher layer names, e.g. {{'2': '2'}}")
        self.term()   # the term's own checks
        if len(self.teachers()) > 1:
            raise RecipeError(f"{name}.teacher: distillation from layers takes one teacher; "
                              f"{len(self.teachers())} are given")

    def check_layers(self, role: str, model: nn.Module) -> None:
        """RecipeError (with the nearest names) for a named layer missing from ``model``."""
        for name in (self.layers if role == "student" else self.layers.values()):
            find_module(model, name, f"the {role}")

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if self.teacher == "current":
            self.check_layers("teacher", model)


def run_layer_pairs(model: nn.Module, config: LayerPairsDistillConfig, ctx, method: str) -> nn.Module:
    task = ctx.require_task("distill")
    if config.alpha > 0 and task.outputs != "logits":
        raise RecipeError(f"{method}: task {task.spec!r} produces {task.outputs}, not class logits; "
                          "set alpha: 0 (no logit term)")
    return train_student(model, config, ctx)


@dataclass(frozen=True)
class HintDistillConfig(LayerPairsDistillConfig):
    """Hint (feature) distillation into a new student (Romero et al. 2015, "FitNets", eq. 3).

    The student is trained with ``task loss + weight * sum_pairs mean((r(v_student) - u_teacher)^2)``
    over the named layer pairs (``layers: {student layer: teacher layer}``), where ``r`` is a
    learned 1x1 convolution (4-D features) or linear layer (3-D / 2-D) created when the widths
    differ, trained with the student and dropped afterwards (the saved student does not hold it).
    ``alpha > 0`` adds logit distillation at ``temperature`` in the same run (as in
    ``distill.logits``); ``alpha: 0`` (the default) trains on hints and the task loss only.

    ``teacher``, ``student``, ``train`` and ``cache`` are as in ``distill.logits``; hints take one
    teacher. The plugin is :class:`~torchslim.train.distill.HintDistillation`; any fine-tune can
    add the same term with ``distill: {teacher: baseline, hint: {layers: {...}}}``.

    Examples
    --------
    >>> c = HintDistillConfig.from_dict({"student": "zoo:digits-cnn", "layers": {"2": "2"}, "epochs": 1})
    >>> c.hint.layers, c.alpha, c.train.epochs
    ({'2': '2'}, 0.0, 1)
    """

    weight: float = option(1.0, low=0.0, doc="weight of the hint loss")
    projection: str = option("auto", choices=("auto", "always", "none"),
                             doc="learned 1x1 conv / linear from student to teacher width: auto (when widths "
                                 "differ), always, none (widths must match); dropped after training")

    @classmethod
    def example(cls) -> "HintDistillConfig":
        return cls(student=ModelRef(spec="zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}),
                   layers={"2": "2"}, train=TrainConfig(epochs=2, loggers=()))

    def term(self) -> HintTerm:
        return HintTerm(layers=self.layers, weight=self.weight, projection=self.projection)

    @property
    def hint(self) -> HintTerm:
        """The hint term these fields describe (what the plugin is built from)."""
        return self.term()


@register_method("distill.hint", HintDistillConfig)
def _distill_hint(model: nn.Module, config: HintDistillConfig, ctx) -> nn.Module:
    """FitNets: a new student trained on named teacher layers (hints), through learned projections."""
    return run_layer_pairs(model, config, ctx, "distill.hint")
