"""Training, fine-tuning and distillation loop (single process or DDP under torchrun)."""

from .config import TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
