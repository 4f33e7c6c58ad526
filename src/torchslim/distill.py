"""Distillation: the configs of the ``distill`` verb and the distillation training plugins.

Examples
--------
>>> from torchslim.distill import LogitsDistillConfig
>>> LogitsDistillConfig(student="zoo:digits-cnn").teacher
'current'
"""

from .methods.distill.attention import AttentionDistillConfig
from .methods.distill.embedding import EmbeddingDistillation, EmbeddingDistillConfig
from .methods.distill.hint import HintDistillConfig
from .methods.distill.logits import LogitsDistillConfig
from .methods.distill.students import FromTeacher, build_student
from .train.config import AttentionTerm, DistillTerm, HintTerm, WeightedTeacher
from .train.distill import AttentionTransfer, HintDistillation
from .train.plugins import LogitDistillation

__all__ = ["LogitsDistillConfig", "HintDistillConfig", "AttentionDistillConfig", "EmbeddingDistillConfig",
           "FromTeacher", "build_student", "DistillTerm", "HintTerm", "AttentionTerm", "WeightedTeacher",
           "LogitDistillation", "HintDistillation", "AttentionTransfer", "EmbeddingDistillation"]
