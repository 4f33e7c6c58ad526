"""The Python API: the same configs and recipes the CLI and YAML use."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .config import MethodConfig
from .errors import RecipeError
from .pipeline import run_recipe
from .progress import listen
from .session import Session
from .recipe import Recipe
from .registry import list_methods
from .specs.tasks import Task, _device_of, build_task
from .train.config import teacher_roles


def _entry_for(config: MethodConfig):
    if not isinstance(config, MethodConfig):
        raise RecipeError(f"apply takes a method config, got {type(config).__name__}: e.g. "
                          "MagnitudePruneConfig(sparsity=0.5) from torchslim.prune, or from a recipe-style mapping "
                          "MagnitudePruneConfig.from_dict({'sparsity': 0.5})")
    matches = [e for e in list_methods() if type(config) is e.config_cls]
    if len(matches) == 1:
        return matches[0]
    raise RecipeError(f"{type(config).__name__} is registered under {len(matches)} methods "
                      f"({', '.join(e.key for e in matches) or 'none'}); use apply_(model, config, method=KEY)")


def apply_(model: nn.Module, config: MethodConfig, *, task: Task | str | None = None,
           method: str | None = None, data_dir: str | None = None) -> nn.Module:
    """Apply one method to ``model`` in place (trailing underscore); returns the result.

    A method that replaces the model (distillation returns the student) returns the new one.

    Parameters
    ----------
    model : nn.Module
        Changed in place.
    config : MethodConfig
        A registered method's config; the method is found from its type.
    task : Task or str, optional
        Needed by methods that train or evaluate (fine-tuning, distillation, export).
    method : str, optional
        ``"verb.name"`` when one config class serves several methods (``train.sgd``).
    data_dir : str, optional
        Data directory for a task given as a string.

    Examples
    --------
    >>> import torchslim
    >>> from torchslim.methods.quantize.linear import LinearQuantConfig
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> torchslim.apply_(m, LinearQuantConfig(bits=8)) is m
    True
    >>> type(m[1]).__name__
    'QuantLinear'
    """
    if isinstance(task, str):
        task = build_task(task, data_dir)
    from .train.config import TrainConfig
    if method is None and type(config) is TrainConfig:  # the plain training config: its optimizer's method
        import dataclasses
        from .registry import get_method
        entry = get_method("train", config.optimizer)
        config = entry.config_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        method = entry.key
    if method is not None:
        verb, _, name = method.partition(".")
        from .registry import get_method
        entry = get_method(verb, name)
    else:
        entry = _entry_for(config)
    if not isinstance(config, entry.config_cls):
        raise RecipeError(f"{entry.key} expects a {entry.config_cls.__name__}, got {type(config).__name__}")
    ctx = Session(task=task, data_dir=data_dir, device=_device_of(model))
    if teacher_roles(config):  # "baseline" and "current" are both the model given here
        snapshot = copy.deepcopy(model)
        ctx.step_input, ctx.baseline = snapshot, lambda: copy.deepcopy(snapshot)
    return entry.handler(model, config, ctx)


def apply(model: nn.Module, config: MethodConfig, **kwargs: Any) -> nn.Module:
    """Apply one method to a deep copy of ``model``; the input is left untouched.

    Takes the same arguments as :func:`apply_`.

    Examples
    --------
    >>> import torch, torchslim
    >>> from torchslim.methods.prune.magnitude import MagnitudePruneConfig
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> p = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.75, scope="layer"))
    >>> float((p[1].weight == 0).float().mean()), bool((m[1].weight == 0).any())
    (0.75, False)
    """
    return apply_(copy.deepcopy(model), config, **kwargs)


def compress(recipe: Recipe | dict | str | os.PathLike, out: str | os.PathLike, *,
             data_dir: str | None = None, resume: bool = False, keep_checkpoints: bool = True,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a recipe (object, mapping or YAML path) into ``out``; returns metrics.json's content.
    ``keep_checkpoints=False`` deletes the per-step models and training checkpoints after success.

    ``on_event(event)`` is called with a dict for every progress line of a long loop (training,
    metric, calibration), every finished training epoch and every finished step
    (``event["kind"]``: ``"progress"``, ``"epoch"``, ``"step"``; see :mod:`torchslim.progress`).
    Log lines go to the standard ``logging`` module under the ``torchslim`` logger.

    Examples
    --------
    >>> import tempfile, torchslim
    >>> out = tempfile.mkdtemp() + "/run"
    >>> m = torchslim.compress({"model": "zoo:digits-cnn", "task": "digits",
    ...                         "train": {"epochs": 1, "loggers": []},
    ...                         "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}, out)
    >>> [s["name"] for s in m["steps"]]
    ['baseline', 'prune-magnitude']
    """
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    with listen(on_event):
        return run_recipe(recipe, out, data_dir=data_dir, resume=resume, keep_checkpoints=keep_checkpoints)
