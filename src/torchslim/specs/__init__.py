"""Spec strings -> models and tasks (CONTRACT section 2)."""

from .models import build_model, register_model_source
from .tasks import Task, build_task, register_task

__all__ = ["build_model", "register_model_source", "Task", "build_task", "register_task"]
