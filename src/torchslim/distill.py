"""Distillation: the configs of the ``distill`` verb and the distillation training plugins.

Examples
--------
>>> from torchslim.distill import LogitsDistillConfig
>>> LogitsDistillConfig(student="zoo:digits-cnn").teacher
'current'
"""

from .methods.distill.attention import AttentionDistillConfig
from .methods.distill.hint import HintDistillConfig
from .methods.distill.logits import LogitsDistillConfig
from .train.config import AttentionTerm, DistillTerm, HintTerm, WeightedTeacher
from .train.distill import AttentionTransfer, HintDistillation
from .train.plugins import LogitDistillation

__all__ = ["LogitsDistillConfig", "HintDistillConfig", "AttentionDistillConfig", "DistillTerm", "HintTerm",
           "AttentionTerm", "WeightedTeacher", "LogitDistillation", "HintDistillation", "AttentionTransfer"]
