"""Training, fine-tuning and distillation loop (single process or DDP under torchrun), and the
plugins through which methods extend it."""

from .config import AdamWTrainConfig, DistillTerm, SGDTrainConfig, TrainConfig
from .plugins import CallbackPlugin, LogitDistillation, TrainingPlugin
from .trainer import Trainer, train

__all__ = ["TrainConfig", "SGDTrainConfig", "AdamWTrainConfig", "DistillTerm", "Trainer", "train", "TrainingPlugin", "CallbackPlugin",
           "LogitDistillation"]
