"""What every merge method shares: the ingredient list, the architecture check and the loop
over tensors.

Which models are merged (a recipe step receives the pipeline's current model):

- **soups** (``uniform``, ``greedy-soup``, ``slerp``): the ingredients are the current model
  followed by ``models``; ``slerp`` takes exactly one entry in ``models``.
- **task vectors** (``task-arithmetic``, ``ties``, ``dare``): without ``base``, the current
  model is the base and ``models`` are the fine-tuned ingredients; with ``base``, the current
  model is the first ingredient, followed by ``models``.

An entry of ``models`` (or ``base``) is a model spec, ``{spec, weights, args}``, or a role:
``baseline`` (the recipe's baseline model) or ``current`` (the model entering the step).

What is merged: parameters by the method; floating-point buffers (BatchNorm running mean and
variance) by the ingredients' (weighted) mean, since a task vector of variances can turn
negative (``slerp``: ``(1 - t) a + t b``); integer buffers (``num_batches_tracked``) are taken
from the first ingredient, and any other integer tensor (quantized codes) must be equal in
every ingredient: merge before quantizing. The merged model is a copy of the first ingredient
(its source record and edit log) with the merged tensors. ``CHANGES_WEIGHTS``: the pipeline
re-estimates BatchNorm statistics after the step (``recalibrate_bn``), as averaged running
statistics do not describe the averaged network.

The step's metrics row gets ``ingredients: [{model, metric}]`` (and ``base``): each model's
task metric on the test split, beside the merged model's own row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ...config import MethodConfig, ModelRef, option
from ...errors import RecipeError, SpecError, UserError
from ...train.config import teacher_ref
from .primitives import first_mismatch, weighted_mean

#: combine(name, tensors of the ingredients, tensor of the base or None) -> merged tensor
Combine = Callable[[str, Sequence[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


def model_ref(value: str | ModelRef, where: str) -> str | ModelRef:
    """A role (``baseline``, ``current``) as given, or a ModelRef for a spec string."""
    return teacher_ref(value, where, kind="role")


def label(ref: str | ModelRef) -> str:
    """How a row names an ingredient: the role, or the spec (with its weights file)."""
    if isinstance(ref, str):
        return f"the {ref} model"
    return ref.spec + (f" (weights {ref.weights})" if ref.weights else "")


@dataclass(frozen=True)
class MergeConfig(MethodConfig):
    """Fields every merge method has; see the module doc for which models are merged."""

    REPLACES_MODEL = True
    CHANGES_WEIGHTS = True
    #: task-vector methods: the current model is the base unless ``base`` is given
    USES_BASE: ClassVar[bool] = False
    #: the exact number of entries ``models`` takes (slerp: 1), or None for one or more
    N_MODELS: ClassVar[int | None] = None

    models: tuple[str | ModelRef, ...] = option((), doc="the other ingredients: specs, {spec, weights, args}, "
                                                "or baseline/current (the current model comes first)")

    @classmethod
    def example(cls) -> "MergeConfig":
        return cls(models=("current",))  # the model with itself: the merge is the model again

    def validate(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "models", tuple(model_ref(m, f"{name}.models[{i}]")
                                                 for i, m in enumerate(self.models)))
        base = getattr(self, "base", None)
        if base is not None:
            object.__setattr__(self, "base", model_ref(base, f"{name}.base"))
        if self.N_MODELS is not None and len(self.models) != self.N_MODELS:
            raise RecipeError(f"{name}.models: takes exactly {self.N_MODELS} model(s), merged with the current "
                              f"model; got {len(self.models)}")
        if not self.models and not (self.USES_BASE and base is not None):
            raise RecipeError(f"{name}.models: missing; give at least one model to merge with the current one "
                              "(a spec, {spec, weights}, or baseline)")
        weights = getattr(self, "weights", None)
        if weights is not None and len(weights) != self.n_ingredients():
            raise RecipeError(f"{name}.weights: {len(weights)} given for {self.n_ingredients()} ingredients "
                              "(one per ingredient, the current model first when it is one)")

    def n_ingredients(self) -> int:
        current_is_base = self.USES_BASE and getattr(self, "base", None) is None
        return len(self.models) + (0 if current_is_base else 1)

    def refs(self) -> tuple[list[str | ModelRef], str | ModelRef | None]:
        """(ingredients, base) as references; the current model is ``current``."""
        base = getattr(self, "base", None)
        if self.USES_BASE and base is None:
            return list(self.models), "current"
        return ["current", *self.models], base

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        for ref in [*self.models, getattr(self, "base", None)]:
            if isinstance(ref, ModelRef):
                try:
                    ref.build()
                except SpecError as exc:
                    raise SpecError(f"{label(ref)}: {exc}") from None

    def check_model(self, model: nn.Module) -> None:
        """The ingredients named by spec have the architecture of ``model`` (the recipe's model)."""
        reference = model.state_dict()
        for ref in [*self.models, getattr(self, "base", None)]:
            if isinstance(ref, ModelRef):
                check_same_architecture(reference, ref.build().state_dict(), "the current model", label(ref))


def check_same_architecture(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                            first: str, this: str) -> None:
    """RecipeError naming the first tensor whose name or shape differs between two state_dicts."""
    found = first_mismatch(reference, other, first, this)
    if found is not None:
        raise RecipeError(f"merge: {this} does not have the architecture of {first}: {found}; only models of "
                          "one architecture can be merged")


def resolve(ref: str | ModelRef, model: nn.Module, ctx) -> nn.Module:
    """The module a reference names: ``current`` is ``model`` itself (left unchanged)."""
    if ref == "current":
        return model
    return ctx.teacher(ref)


def merge_state(models: Sequence[nn.Module], base: nn.Module | None, combine: Combine,
                names: Sequence[str], buffer_weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The merged state_dict of models of one architecture (checked by the caller with
    :func:`check_same_architecture`): parameters through ``combine``, float buffers by their
    (weighted) mean, integer tensors from the first model (equal in every model, except
    ``num_batches_tracked``). ``names`` label the models in errors."""
    states = [m.state_dict() for m in models]
    base_state = base.state_dict() if base is not None else None
    params = {n for n, _ in models[0].named_parameters(remove_duplicate=False)}
    merged = {}
    for key, first in states[0].items():
        tensors = [s[key] for s in states]
        if not first.is_floating_point():
            if not key.endswith("num_batches_tracked"):
                for t, name in zip(tensors[1:], names[1:]):
                    if not torch.equal(t.to(first.device), first):
                        raise RecipeError(f"merge: integer tensor {key!r} differs between {names[0]} and {name} "
                                          "(quantized codes cannot be averaged); merge before quantizing")
            merged[key] = first.clone()
        elif key in params:
            device = first.device
            tensors = [t.to(device) for t in tensors]
            merged[key] = combine(key, tensors, None if base_state is None else base_state[key].to(device))
        else:
            merged[key] = weighted_mean([t.to(first.device) for t in tensors], buffer_weights)
    return merged


def evaluate(model: nn.Module, task, split: str) -> float | None:
    """The task metric of ``model`` on ``split``, or None for a task without one."""
    if task is None or task.metric_name is None:
        return None
    return task.evaluate(model, split=split)


def run_merge(model: nn.Module, config: MergeConfig, ctx, combine: Combine,
              buffer_weights: Sequence[float] | None = None,
              choose: Callable[[list[nn.Module], list[str]], list[int]] | None = None) -> nn.Module:
    """Resolve the ingredients, merge them tensor by tensor, and record each one's test metric
    in the step's row. ``choose(models, names)`` (greedy soup) picks which ingredients go in."""
    refs, base_ref = config.refs()
    models = [resolve(r, model, ctx) for r in refs]
    names = [label(r) for r in refs]
    base = resolve(base_ref, model, ctx) if base_ref is not None else None
    reference = models[0].state_dict()
    base_name = f"{label(base_ref)} (the base)" if base_ref is not None else ""
    for m, name in zip([*models[1:], base], [*names[1:], base_name]):
        if m is not None:  # every problem of architecture before any metric is computed
            check_same_architecture(reference, m.state_dict(), names[0], name)
    info = {"ingredients": [{"model": n, "metric": evaluate(m, ctx.task, "test")} for m, n in zip(models, names)]}
    if base is not None:
        info["base"] = {"model": label(base_ref), "metric": evaluate(base, ctx.task, "test")}
    if choose is not None:
        chosen = choose(models, names)
        models, names = [models[i] for i in chosen], [names[i] for i in chosen]
    state = merge_state(models, base, combine, names, buffer_weights)
    out = copy.deepcopy(models[0])
    out.load_state_dict(state)
    ctx.info.setdefault("metrics", {}).update(info)
    return out


def need_metric_task(task, what: str) -> None:
    """UserError unless ``task`` has data and a metric (greedy soup ranks models by it)."""
    if task is not None and getattr(task, "metric_name", None) is None:
        raise UserError(f"{what}: task {task.spec!r} has no metric; the greedy soup ranks models by the "
                        "validation metric: give a task with data (e.g. digits, mnist)")

