"""Spec strings -> models and tasks (CONTRACT section 2).

Importing this package registers every built-in source and task: ``zoo:``, ``torchvision:``,
``py:``, ``artifact:`` (models.py), ``hf:`` (hf.py), ``digits``, ``mnist``, ``fashion-mnist``,
``shape`` (tasks.py), ``stsb`` (stsb.py), ``imagefolder`` and ``py`` (extra_tasks.py).
``artifact:`` is registered by :mod:`torchslim.artifact`, which depends on the specs, not the
other way round.
"""

from . import extra_tasks, hf, stsb  # noqa: F401  (registration happens on import)
from .. import artifact  # noqa: F401,E402  (registers the artifact: model source)
from .models import attach_source, build_model, register_model_source
from .tasks import Task, build_task, register_task

__all__ = ["attach_source", "build_model", "register_model_source", "Task", "build_task", "register_task"]
