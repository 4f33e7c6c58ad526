"""Training, fine-tuning and distillation loop (single process or DDP under torchrun), and the
plugins through which methods extend it."""

from .config import DistillTerm, TrainConfig
from .plugins import CallbackPlugin, LogitDistillation, TrainingPlugin
from .trainer import Trainer, train

__all__ = ["TrainConfig", "DistillTerm", "Trainer", "train", "TrainingPlugin", "CallbackPlugin",
           "LogitDistillation"]
