"""Distillation: the configs of the ``distill`` verb and the distillation training plugin.

Examples
--------
>>> from torchslim.distill import LogitsDistillConfig
>>> LogitsDistillConfig(student="zoo:digits-cnn").teacher
'current'
"""

from .methods.distill.embedding import EmbeddingDistillation, EmbeddingDistillConfig
from .methods.distill.logits import LogitsDistillConfig
from .methods.distill.students import FromTeacher, build_student
from .train.config import DistillTerm
from .train.plugins import LogitDistillation

__all__ = ["LogitsDistillConfig", "EmbeddingDistillConfig", "FromTeacher", "build_student", "DistillTerm",
           "LogitDistillation", "EmbeddingDistillation"]
