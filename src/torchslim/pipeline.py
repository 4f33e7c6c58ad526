"""Run a recipe: baseline, then each step; measure, checkpoint and report every one.

Output layout (CONTRACT section 5). The run works in a temporary sibling ``.DIR.partial`` and
renames it to ``DIR`` when everything is written; a failed run keeps the sibling, whose
``steps/NN-NAME/`` checkpoints ``--resume`` continues from (inside a step, the trainer resumes
from its last epoch checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as tsdist
from ._version import __version__
from .artifact import load, save
from .errors import Problems, UserError
from .fileio import exclusive_lock, sweep_temporaries, write_json, write_text
from .measure import check_runs, measure
from .numerics import check_finite_outputs, check_finite_weights
from .progress import emit
from .recipe import Recipe, Step
from .registry import get_method
from .specs.models import build_model
from .specs.tasks import Task, _device_of, build_task, to_device
from .session import Session, resolve_device
from .train.config import teacher_roles

log = logging.getLogger(__name__)


#: the session's earlier name (handlers written against it keep working)
StepContext = Session


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "world_size": tsdist.world_size(), "python": platform.python_version()}


def apply_step(model: nn.Module, step: Step, ctx: StepContext) -> nn.Module:
    entry = get_method(step.verb, step.method)
    out = entry.handler(model, step.config, ctx)
    if not isinstance(out, nn.Module):
        raise TypeError(f"{step.key} handler returned {type(out).__name__}, not an nn.Module")
    return out


def unique_step_names(steps: list[tuple[str, str]]) -> list[str]:
    """Names of steps given as ``(verb, method)``: ``verb-method`` (``verb`` for the default
    method), with ``-2``, ``-3`` appended when the same verb and method come again."""
    names, seen = [], {}
    for verb, method in steps:
        name = verb if method == "default" else f"{verb}-{method}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def preflight(recipe: Recipe, data_dir: str | None = None) -> tuple[nn.Module, Task]:
    """Check what can be checked before any work, and report every problem found at once: task
    spec and its data files, model spec and weights (and that the model runs on the task's
    inputs), each step's readiness (optional packages, teachers), module patterns and
    :meth:`~torchslim.config.MethodConfig.check_model` (e.g. a ``group_size`` that does not
    divide a layer) on the model as each step will receive it, up to the first step that
    replaces the model or changes its shapes. Returns the built model and task."""
    from .modules import check_patterns

    problems = Problems()
    task = build_task(recipe.task, data_dir)
    trains = (recipe.train is not None and not recipe.model.pretrained) or any(
        s.config.trains() for s in recipe.steps)
    with problems.check():
        if trains or task.metric_name is not None:
            task.split("train")  # missing or broken data files fail here, as does a task without data
        if task.metric_name is not None:
            task.split("test")
    if recipe.train is not None:
        with problems.check():
            try:
                recipe.train.check_ready(task)
            except UserError as exc:
                raise type(exc)(f"train.{exc}") from None
    with problems.check():
        try:
            recipe.measure.check_ready(task)
        except UserError as exc:
            raise type(exc)(f"measure.{exc}") from None
    with problems.check():
        resolve_device(recipe.device)  # `cuda` on a machine without one fails here, not after the baseline
    torch.manual_seed(recipe.train.seed if recipe.train else 0)  # reproducible random init
    model, runs = None, False
    with problems.check():
        model = build_model(recipe.model.spec, weights=recipe.model.weights, args=recipe.model.args,
                            output=recipe.model.output)
        try:
            check_runs(model, task, f"model {recipe.model.spec}", trains=trains)
            check_finite_weights(model, f"model {recipe.model.spec}")
            check_finite_outputs(model, to_device(task.example_inputs(2), _device_of(model)),
                                 f"model {recipe.model.spec}")
            runs = True   # teachers by role are this model: checked against it only when it runs
        except UserError as exc:
            raise type(exc)(f"model: {exc}") from None
    names_known = shapes_known = model is not None
    for i, step in enumerate(recipe.steps, start=1):
        where = f"steps.{i - 1}.{step.verb}"
        with problems.check():
            try:
                step.config.check_ready(task)
            except UserError as exc:
                raise type(exc)(f"{where}: {exc}") from None
        if names_known:
            unmatched = False
            for key, patterns in step.config.target_patterns().items():
                found = len(problems.errors)
                with problems.check():
                    check_patterns(model, patterns, f"{where}.{key}")
                unmatched |= key in ("targets", "ignore") and len(problems.errors) > found
            if not unmatched:  # check_targets reads targets and ignore again: a bad pattern is said once, above
                with problems.check():
                    try:
                        step.config.check_targets(model)  # a named module of a class the method refuses
                    except UserError as exc:
                        raise type(exc)(f"{where}: {exc}") from None
        if model is not None:
            with problems.check():
                try:
                    if shapes_known:
                        step.config.check_model(model)
                    # teachers by role: the recipe's model as built, the model entering the step
                    if runs:
                        roles = {"baseline": model, **({"current": model} if shapes_known else {})}
                        step.config.check_teachers(roles, model if names_known else None, task, shapes_known)
                except UserError as exc:
                    raise type(exc)(f"{where}: {exc}") from None
        if step.config.REPLACES_MODEL:
            names_known = shapes_known = False  # later steps target a model that does not exist yet
        if step.config.CHANGES_SHAPES:
            shapes_known = False
        if step.config.CHANGES_NAMES:
            names_known = shapes_known = False   # check_model finds its layers by name too
    problems.raise_all(recipe.locate)
    return model, task


def metric_warnings(row: dict[str, Any], before: list[dict[str, Any]], task: Task,
                    warn_drop: float) -> list[dict[str, str]]:
    """What a user must not miss in a measured row (each also logged at WARNING level): a
    baseline within 10% of the way from chance level to perfect (``chance_level``), a step whose
    metric is worse than the previous step's by more than ``warn_drop`` (``metric_drop``), and a
    non-finite metric (``metric_not_finite``)."""
    import math

    metric = row.get("metric") or {}
    value = metric.get("value")
    if not isinstance(value, (int, float)):
        return []
    found = []
    if not math.isfinite(value):
        found.append({"code": "metric_not_finite",
                      "message": f"the {metric.get('name')} is {value}: the model outputs NaN or "
                                 "inf (check its weights and inputs)"})
    elif row["verb"] == "baseline":
        chance = task.chance_level(metric.get("split", "test")) if hasattr(task, "chance_level") else None
        if chance is not None and metric.get("higher_is_better", True) and value < chance + 0.1 * (1 - chance):
            found.append({"code": "chance_level",
                          "message": f"baseline {metric.get('name')} {value:.4f} is near chance level ({chance:.4f}): "
                                     "the model is untrained or does not fit the task, so the compression "
                                     "figures below say little; train it (train: {epochs: N}) or check its weights"})
    else:
        prev = next((r for r in reversed(before) if isinstance((r.get("metric") or {}).get("value"), (int, float))),
                    None)
        if prev is not None and math.isfinite(prev["metric"]["value"]):
            drop = prev["metric"]["value"] - value
            if not metric.get("higher_is_better", True):
                drop = -drop
            if drop > warn_drop:
                found.append({"code": "metric_drop",
                              "message": f"{metric.get('name')} fell from {prev['metric']['value']:.4f} "
                                         f"to {value:.4f} ({drop:.4f} lost, more than measure.warn_drop={warn_drop}); "
                                         + _drop_advice(row.get("config") or {})})
    for w in found:
        log.warning("%s: %s", row["name"], w["message"])
    return found


def _drop_advice(config: dict[str, Any]) -> str:
    """What to do about a step's metric drop, by the fields its config has: a fine-tune for steps
    that take one, a longer training for steps that train a new model (distillation), else a
    milder step."""
    if "finetune" in config:
        return "fine-tune after the step (finetune: {epochs: N}) or make it milder"
    if "train" in config:
        return "train longer (more epochs in the step's train: {epochs: N}) or make the step milder"
    return "make the step milder"


def step_name(recipe: Recipe, index: int) -> str:
    """The metrics.json name of step ``index`` (0 = baseline): ``verb-method``, with ``-2``, ``-3``
    appended when the same verb and method come again, so names stay unique."""
    if index == 0:
        return "baseline"
    return unique_step_names([(s.verb, s.method) for s in recipe.steps[:index]])[-1]


class RunObserver:
    """Hooks through which a run is kept: every one optional.

    A run (:func:`execute`) is in memory: it trains, applies and measures, and tells its
    observers. :class:`OutputDir` is the observer that makes a run a directory (checkpoints,
    artifacts, metrics.json, report, resume); a search runs many cheap candidates with no
    observer at all, reusing one measured baseline.

    Queries (``finished_row``, ``load_model``, ``workdir``, ``save_model``) are asked of each
    observer in turn; the first answer that is not None is used.
    """

    def finished_row(self, index: int) -> dict[str, Any] | None:
        """The metrics row of step ``index`` if an earlier run finished it (resume)."""
        return None

    def load_model(self, index: int) -> nn.Module | None:
        """The model as step ``index`` left it, when that step finished earlier."""
        return None

    def workdir(self, index: int) -> Path | None:
        """Scratch directory of step ``index`` (training checkpoints, resumed from)."""
        return None

    def save_model(self, index: int, model: nn.Module) -> Path | None:
        """Keep the model after step ``index``; returns the artifact directory whose size is
        the step's ``size_bytes`` (else the size of a temporary save is measured)."""
        return None

    def step_done(self, index: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Step ``index`` finished and was measured (``metrics`` holds every row so far)."""

    def run_done(self, metrics: dict[str, Any], model: nn.Module) -> None:
        """Every step finished."""


class _Callback(RunObserver):
    def __init__(self, fn: Callable[[dict], None]) -> None:
        self.fn = fn

    def step_done(self, index: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.fn(row)


def _first(observers: list[RunObserver], method: str, *args: Any) -> Any:
    for obs in observers:
        got = getattr(obs, method)(*args)
        if got is not None:
            return got
    return None


def execute(recipe: Recipe, task: Task, model: nn.Module, *, device: torch.device | None = None,
            data_dir: str | None = None, observers: list[RunObserver] | tuple = (),
            out_dir: Path | None = None, log_dir: Path | None = None,
            baseline: tuple[nn.Module, dict[str, Any]] | None = None,
            final_dir: Path | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Run ``recipe`` in memory on ``model``: baseline (trained when the recipe says), then every
    step, each measured the same way; returns ``(metrics, final model)``.

    Parameters
    ----------
    baseline : (model, row), optional
        A baseline already trained and measured (a search's candidates share one): no baseline
        training or measurement; the steps start from a copy of that model.
    observers : list of RunObserver
        Keep the run (see :class:`RunObserver`); none for a throw-away candidate.
    out_dir, log_dir : Path, optional
        Where file-writing steps (export) and TensorBoard write.
    final_dir : Path, optional
        What ``out_dir`` will be renamed to (the paths log lines show).

    Examples
    --------
    >>> import torchslim
    >>> r = Recipe.from_dict({"model": "zoo:lenet-300-100", "task": "shape:1x28x28",
    ...                       "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
    ...                       "measure": {"batch_sizes": [1], "latency": False}})
    >>> m, _ = execute(r, torchslim.build_task(r.task), torchslim.build_model("zoo:lenet-300-100"))
    >>> [s["name"] for s in m["steps"]], m["steps"][1]["nonzero_params"] < m["steps"][0]["nonzero_params"]
    (['baseline', 'prune-magnitude'], True)
    """
    observers = list(observers)
    device = device or resolve_device(recipe.device)
    main = tsdist.is_main()
    metrics: dict[str, Any] = {
        "schema_version": 1, "torchslim_version": __version__, "model": recipe.model.spec,
        "task": recipe.task, "preprocessing": task.preprocessing,
        "environment": {**environment(), "device": str(device)}, "steps": []}
    ctx_base = dict(task=task, out_dir=out_dir, log_dir=log_dir, data_dir=data_dir, device=device,
                    final_dir=final_dir)
    wants_baseline = any("baseline" in teacher_roles(s.config) for s in recipe.steps)
    kept_baseline: nn.Module | None = None

    def finish_step(index: int, step: Step | None, model: nn.Module, t0: float,
                    extra: dict[str, Any] | None = None, warnings: list[dict[str, str]] | None = None) -> None:
        what = "the trained baseline" if step is None else f"step {index} ({step_name(recipe, index)})"
        check_finite_weights(model, what)  # nothing non-finite is saved or measured as a result
        check_finite_outputs(model, to_device(task.example_inputs(2), device), what)
        if main:
            art = _first(observers, "save_model", index, model)
            row = {"name": step_name(recipe, index),
                   "verb": "baseline" if step is None else step.verb,
                   "method": None if step is None else step.method}
            row.update(measure(model, task, batch_sizes=recipe.measure.batch_sizes,
                               artifact_dir=art, runtime=recipe.measure.runtime,
                               split=recipe.measure.split, latency=recipe.measure.latency))
            row.update(extra or {})  # a handler's own figures, e.g. ONNX Runtime latency
            row["wall_s"] = round(time.perf_counter() - t0, 3)
            if step is not None:
                row["config"] = step.config.to_dict()
            found = list(warnings or []) + metric_warnings(row, metrics["steps"], task, recipe.measure.warn_drop)
            if found:
                row["warnings"] = found
            metrics["steps"].append(row)
            for obs in observers:
                obs.step_done(index, row, metrics)
            emit("step", index=index, name=row["name"], row=row)
        tsdist.barrier()

    def baseline_model() -> nn.Module:
        if kept_baseline is not None:
            return copy.deepcopy(kept_baseline)
        found = _first(observers, "load_model", 0)
        if found is None:
            raise UserError("the baseline model is not available to this step")
        return found.to(device)

    # -- baseline --------------------------------------------------------------------------
    t0 = time.perf_counter()
    done_index: int | None = None  # a finished step whose model is loaded only if a later step needs it
    row = None if baseline is not None else _first(observers, "finished_row", 0)
    if baseline is not None:
        model = copy.deepcopy(baseline[0]).to(device)
        metrics["steps"].append(copy.deepcopy(baseline[1]))
    elif row is not None:
        done_index = 0
        metrics["steps"].append(row)
        log.info("resume: baseline already done")
    else:
        model = model.to(device)
        extra = None
        if recipe.train is not None and not recipe.model.pretrained:
            ctx = Session(workdir=_first(observers, "workdir", 0), **ctx_base)
            model = ctx.train(model, recipe.train, desc="baseline")
            extra = ctx.info.get("metrics")  # the training curve
        finish_step(0, None, model, t0, extra)
    if wants_baseline and done_index is None:
        kept_baseline = copy.deepcopy(model)

    # -- compression steps -----------------------------------------------------------------
    for i, step in enumerate(recipe.steps, start=1):
        t0 = time.perf_counter()
        row = _first(observers, "finished_row", i)
        if row is not None:
            done_index = i
            metrics["steps"].append(row)
            log.info("resume: step %s already done", step_name(recipe, i))
            continue
        if done_index is not None:
            model = _first(observers, "load_model", done_index).to(device)
            done_index = None
        log.info("step %d/%d: %s", i, len(recipe.steps), step.key)
        ctx = Session(workdir=_first(observers, "workdir", i), **ctx_base)
        roles = teacher_roles(step.config)
        if "current" in roles:
            ctx.step_input = copy.deepcopy(model)
        if "baseline" in roles:
            ctx.baseline = baseline_model
        if not step.config.RANK0_ONLY or main:  # a step that only writes files runs on rank 0
            model = apply_step(model, step, ctx)
        extra = dict(ctx.info.get("metrics") or {})
        if (recipe.recalibrate_bn and step.config.CHANGES_WEIGHTS and not step.config.trains()
                and task.metric_name is not None):
            layers = ctx.recalibrate_batchnorm(model, recipe.recalibrate_bn)
            if layers:
                log.info("%s: BatchNorm statistics of %d layers re-estimated on %d training examples "
                         "(the recipe's top-level key recalibrate_bn: 0 turns this off)", step.key, layers,
                         recipe.recalibrate_bn)
                extra["bn_recalibrated"] = {"layers": layers, "samples": recipe.recalibrate_bn}
        finish_step(i, step, model, t0, extra, ctx.warnings)

    if done_index is not None:  # every step had finished before: the last one's model
        model = _first(observers, "load_model", done_index)
    if main:
        for obs in observers:
            obs.run_done(metrics, model)
    tsdist.barrier()
    return metrics, model


def recipe_code_digests(recipe: Recipe) -> frozenset[str]:
    """sha256 digests of the ``py:`` model files the recipe itself names (its model, and any
    teacher or student spec in a step): the code a resumed run may rebuild its own checkpoints
    from. A checkpoint whose manifest was edited to name another file is refused."""
    import dataclasses
    import hashlib

    from .config import ModelRef

    specs: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, ModelRef):
            specs.append(value.spec)
        elif isinstance(value, str) and value.startswith("py:"):
            specs.append(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(recipe.model)
    for step in recipe.steps:
        walk(step.config)
    digests = set()
    for spec in specs:
        prefix, _, ref = spec.partition(":")
        file = Path(ref.rpartition(":")[0]).expanduser()
        if prefix == "py" and file.is_file():
            digests.add(hashlib.sha256(file.read_bytes()).hexdigest())
    return frozenset(digests)


class OutputDir(RunObserver):
    """The observer that makes a run an output directory (CONTRACT section 5).

    It works in ``.DIR.partial``: per-step ``steps/NN-NAME/{model,step.json}`` checkpoints and
    training checkpoints, ``metrics.json`` rewritten after every step, then ``model/``, the
    report, and the rename to ``DIR``. With ``resume`` it answers for the steps a failed run
    finished. Only rank 0 writes.

    It adds a top-level ``run`` object to metrics.json: ``started`` and ``finished`` (ISO-8601
    UTC; ``finished`` null until the run ends), ``wall_s`` (seconds from start to end), ``command``
    (``sys.argv`` as run), ``host`` (``{"cpus": logical CPUs, "threads": torch intra-op
    threads}``) and ``resumed`` (whether this invocation continued a failed run).
    """

    def __init__(self, recipe: Recipe, out: Path, partial: Path, resume: bool,
                 keep_checkpoints: bool = True, preprocessing: dict[str, Any] | None = None) -> None:
        self.recipe, self.out, self.partial, self.resume = recipe, out, partial, resume
        self.keep_checkpoints = keep_checkpoints
        self.preprocessing = preprocessing   # the task's, recorded in every saved artifact
        self.trusted_code = recipe_code_digests(recipe)
        self._t0 = time.perf_counter()
        self.run_info: dict[str, Any] = {
            "started": _utc_now(), "finished": None, "wall_s": None, "command": list(sys.argv),
            "host": {"cpus": os.cpu_count(), "threads": torch.get_num_threads()}, "resumed": resume}

    def _dir(self, index: int) -> Path:
        return self.partial / "steps" / f"{index:02d}-{step_name(self.recipe, index)}"

    def finished_row(self, index: int) -> dict[str, Any] | None:
        f = self._dir(index) / "step.json"
        if not (self.resume and f.is_file()):
            return None
        try:
            row = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            row = None
            log.warning("resume: %s is unreadable (%s); the step runs again", f, str(exc)[:120])
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("name"), str)):
            log.warning("resume: %s is not a step row; the step runs again", f)
            row = None
        return row

    def load_model(self, index: int) -> nn.Module | None:
        path = self._dir(index) / "model"
        if not path.is_dir():
            return None
        # this run's own checkpoints: only the py: files the recipe names may be imported
        return load(path, trusted_code=self.trusted_code)

    def workdir(self, index: int) -> Path:
        return self._dir(index)

    def save_model(self, index: int, model: nn.Module) -> Path:
        sdir = self._dir(index)
        sdir.mkdir(parents=True, exist_ok=True)
        save(model, sdir / "model", extra={"step": sdir.name}, preprocessing=self.preprocessing)
        return sdir / "model"

    def step_done(self, index: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_json(self._dir(index) / "step.json", row)
        metrics["run"] = self.run_info
        write_json(self.partial / "metrics.json", metrics)

    def run_done(self, metrics: dict[str, Any], model: nn.Module) -> None:
        from .report import write_report

        last = self._dir(len(self.recipe.steps)) / "model"
        final = self.partial / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(last, final)
        self.run_info.update(finished=_utc_now(), wall_s=round(time.perf_counter() - self._t0, 3))
        metrics["run"] = self.run_info
        write_json(self.partial / "metrics.json", metrics)
        write_report(self.partial)
        if not self.keep_checkpoints:  # only each step's measured row stays
            for sdir in (self.partial / "steps").iterdir():
                for item in sdir.iterdir():
                    if item.name != "step.json":
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
        for p in sweep_temporaries(self.partial):  # left by a writer killed in an earlier attempt
            log.debug("removed the leftover temporary %s", p)
        if self.out.exists():
            self.out.rmdir()  # empty (checked before the run)
        os.replace(self.partial, self.out)


def _stages(resolved: dict[str, Any]) -> list[Any]:
    """A resolved recipe as its stages: 0 = what the baseline depends on, then each step."""
    head = {k: resolved.get(k) for k in ("version", "model", "task", "train", "measure", "recalibrate_bn")}
    return [head] + list(resolved.get("steps") or [])


def _stage_dirs(stages: list[Any]) -> list[str]:
    """The step folders of a resolved recipe's stages, named as :meth:`OutputDir._dir` names them:
    ``NN-`` and the step's :func:`step_name`."""
    steps = []
    for stage in stages[1:]:
        ((verb, body),) = stage.items()
        steps.append((verb, body.get("method", "default") if isinstance(body, dict) else "default"))
    return ["00-baseline"] + [f"{i:02d}-{n}" for i, n in enumerate(unique_step_names(steps), start=1)]


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'value'}: {old!r} -> {new!r}"


def reconcile_resume(recipe: Recipe, partial: Path) -> str | None:
    """Let ``--resume`` take a recipe that differs from the failed run's after its last finished
    step: the finished steps (and what the baseline depends on, once the baseline finished) must
    be unchanged, and so must a step interrupted with checkpoints (nothing is discarded without
    the user saying so: the message names the directory to remove); a changed step that had not
    started runs with the new settings. Returns the problem, or None when the run can resume."""
    import yaml

    saved = partial / "recipe.yaml"
    try:
        old = yaml.safe_load(saved.read_text())
        try:  # written by this or an earlier torchslim: fields added since then take their defaults
            old = Recipe.from_dict(old).to_dict()
        except UserError:
            pass  # compared as written
        old_stages = _stages(old)
    except (yaml.YAMLError, OSError, AttributeError, TypeError) as exc:
        return f"--resume: cannot read the failed run's recipe {saved} ({exc}); start a new --out"
    new_stages = _stages(recipe.to_dict())
    steps_dir = partial / "steps"
    old_dirs = _stage_dirs(old_stages)
    finished = 0
    while finished < len(old_stages) and (steps_dir / old_dirs[finished] / "step.json").is_file():
        finished += 1
    for i in range(finished):
        if i >= len(new_stages) or old_stages[i] != new_stages[i]:
            what = "the baseline" if i == 0 else f"step {i} ({old_dirs[i].split('-', 1)[1]})"
            change = ("removed" if i >= len(new_stages) else
                      _first_difference(old_stages[i], new_stages[i], "" if i == 0 else f"steps.{i - 1}"))
            return (f"--resume: {what} already finished with other settings ({change}); only steps after "
                    f"the last finished one may change; restore it or start a new --out")
    for i in range(finished, len(old_stages)):
        if i >= len(new_stages) or old_stages[i] != new_stages[i]:
            stale = steps_dir / old_dirs[i]
            if stale.is_dir() and any(p.is_file() for p in stale.rglob("*")):
                what = "the baseline" if i == 0 else f"step {i} ({stale.name.split('-', 1)[1]})"
                change = ("removed" if i >= len(new_stages) else
                          _first_difference(old_stages[i], new_stages[i], "" if i == 0 else f"steps.{i - 1}"))
                return (f"--resume: {what} was interrupted with other settings ({change}); resume with "
                        f"them to keep its checkpoints, or remove {stale} to run it anew with the new ones")
            if stale.exists():
                shutil.rmtree(stale)
    return None


def _utc_now() -> str:
    """The current time as ISO-8601 UTC to the second, e.g. ``2026-01-31T12:00:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_recipe(recipe: Recipe, out: str | os.PathLike, *, data_dir: str | None = None,
               resume: bool = False, on_step: Callable[[dict], None] | None = None,
               keep_checkpoints: bool = True) -> dict[str, Any]:
    """Run ``recipe`` into the directory ``out`` (an :class:`OutputDir` observer on
    :func:`execute`); returns the metrics dict (also written to out/metrics.json).
    ``keep_checkpoints=False`` deletes the per-step models and training checkpoints once the run
    succeeded (``out/steps/NN-NAME/step.json`` stays)."""
    main = tsdist.is_main()
    with contextlib.ExitStack() as stack:
        problem = None
        try:  # every rank resolves the path alike; rank 0's verdict is the one every rank raises
            out = resolve_out(out)
            if main:
                try:  # --out runs/first in a fresh checkout: the parent is made, as mkdir -p would
                    out.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise UserError(f"--out {out}: cannot create its parent directory: {exc.strerror or exc}") from None
                stack.enter_context(exclusive_lock(out.parent / f".{out.name}.lock", f"output directory {out}"))
        except UserError as exc:
            problem = str(exc) if main else None
        problem = tsdist.broadcast_object(problem)
        if problem:
            raise UserError(problem)
        return _run_locked(recipe, Path(out), data_dir=data_dir, resume=resume, on_step=on_step,
                           keep_checkpoints=keep_checkpoints)


def resolve_out(out: str | os.PathLike) -> Path:
    """``--out`` checked before any work: a symlink stands for its target (written there, the
    link kept); ``.``, ``..``, the current directory or one of its parents, or a root are
    refused (the run renames a finished directory into place, which cannot be done there)."""
    out = Path(out)
    if out.is_symlink() or out.name in ("", ".", ".."):
        out = out.resolve()
    here = Path.cwd().resolve()
    full = out.resolve()
    if full == here or full in here.parents:
        raise UserError(f"--out {out}: the current directory or one of its parents; name a new directory, "
                        "e.g. --out runs/first")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    return out


def _run_locked(recipe: Recipe, out: Path, *, data_dir: str | None, resume: bool,
                on_step: Callable[[dict], None] | None, keep_checkpoints: bool) -> dict[str, Any]:
    partial = out.parent / f".{out.name}.partial"
    main = tsdist.is_main()
    # under torchrun rank 0 alone looks at the file system (it creates `partial` below, which
    # the other ranks must not mistake for a failed run's) and every rank raises its verdict
    problem = None
    if main and (out.exists() or out.is_symlink()) and not out.is_dir():
        problem = f"--out {out} exists and is not a directory; choose another --out"
    elif main and out.exists() and any(out.iterdir()):
        problem = (f"output directory {out} already exists and is not empty; "
                   "choose another --out or remove it")
    elif main and partial.exists() and not resume:
        problem = (f"a failed run left its checkpoints in {partial}; pass --resume to continue it "
                   "or remove that directory to start over")
    problem = tsdist.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    # validate everything that can be validated before any work
    first_model, task = preflight(recipe, data_dir)
    if recipe.search and main:
        log.warning("the recipe's search: block (%s) is for a search command, not for compress, which "
                    "runs the recipe's own values once", ", ".join(recipe.search))
    resolved = recipe.to_yaml()
    if main:
        try:
            partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output directory next to {out}: {exc.strerror or exc}") from None
        saved = partial / "recipe.yaml"
        if resume and saved.is_file() and saved.read_text() != resolved:
            problem = reconcile_resume(recipe, partial)
        if problem is None:
            write_text(saved, resolved)
    problem = tsdist.broadcast_object(problem)  # also the barrier before the other ranks go on
    if problem:
        raise UserError(problem)
    (partial / "steps").mkdir(parents=True, exist_ok=True) if main else None
    observers: list[RunObserver] = [OutputDir(recipe, out, partial, resume, keep_checkpoints, task.preprocessing)]
    if on_step:
        observers.append(_Callback(on_step))
    metrics, _ = execute(recipe, task, first_model, data_dir=data_dir, observers=observers,
                         out_dir=partial, log_dir=partial / "logs", final_dir=out)
    return metrics
