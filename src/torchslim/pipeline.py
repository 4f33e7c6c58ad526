"""Run a recipe: baseline, then each step; measure, checkpoint and report every one.

Output layout (CONTRACT section 5). The run works in a temporary sibling ``.DIR.partial`` and
renames it to ``DIR`` when everything is written; a failed run keeps the sibling, whose
``steps/NN-NAME/`` checkpoints ``--resume`` continues from (inside a step, the trainer resumes
from its last epoch checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as tsdist
from ._version import __version__
from .artifact import load, save
from .errors import RecipeError, UserError
from .fileio import write_json, write_text
from .measure import check_runs, measure
from .recipe import Recipe, Step
from .registry import get_method
from .specs.models import build_model
from .specs.tasks import Task, build_task
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


def step_dirname(index: int, step: Step | None) -> str:
    if step is None:
        return "00-baseline"
    if step.method == "default":
        return f"{index:02d}-{step.verb}"
    return f"{index:02d}-{step.verb}-{step.method}"


def preflight(recipe: Recipe, data_dir: str | None = None) -> tuple[nn.Module, Task]:
    """Check what can be checked before any work: task spec and its data files, model spec and
    weights, and every step's module patterns (up to the first step that replaces the model).
    Returns the built model and task."""
    from .modules import check_patterns

    task = build_task(recipe.task, data_dir)
    trains = (recipe.train is not None and not recipe.model.pretrained) or any(
        s.config.trains() for s in recipe.steps)
    if trains or task.metric_name is not None:
        task.split("train")  # missing or broken data files fail here, as does a task without data
    if task.metric_name is not None:
        task.split("test")
    if recipe.train is not None:
        try:
            recipe.train.check_ready(task)
        except UserError as exc:
            raise type(exc)(recipe.locate(f"train.{exc}")) from None
    try:
        recipe.measure.check_ready(task)
    except UserError as exc:
        raise type(exc)(recipe.locate(f"measure.{exc}")) from None
    try:
        resolve_device(recipe.device)  # `cuda` on a machine without one fails here, not after the baseline
    except UserError as exc:
        raise type(exc)(recipe.locate(str(exc))) from None
    torch.manual_seed(recipe.train.seed if recipe.train else 0)  # reproducible random init
    model = build_model(recipe.model.spec, weights=recipe.model.weights, args=recipe.model.args)
    try:
        check_runs(model, task, f"model {recipe.model.spec}")
    except UserError as exc:
        raise type(exc)(recipe.locate(f"model: {exc}")) from None
    model_known = True
    for i, step in enumerate(recipe.steps, start=1):
        where = f"steps.{i - 1}.{step.verb}"
        try:
            step.config.check_ready(task)
        except UserError as exc:
            raise type(exc)(recipe.locate(f"{where}: {exc}")) from None
        if step.config.REPLACES_MODEL:
            model_known = False  # later steps target a model that does not exist yet
        for key, patterns in step.config.target_patterns().items():
            if model_known:
                try:
                    check_patterns(model, patterns, f"{where}.{key}")
                except RecipeError as exc:
                    raise RecipeError(recipe.locate(str(exc))) from None
    return model, task


def step_name(recipe: Recipe, index: int) -> str:
    """The metrics.json name of step ``index`` (0 = baseline): ``verb-method``, with ``-2``, ``-3``
    appended when the same verb and method come again, so names stay unique."""
    if index == 0:
        return "baseline"
    names = [step_dirname(i, s)[3:] for i, s in enumerate(recipe.steps, start=1)]
    name = names[index - 1]
    repeat = names[:index].count(name)
    return name if repeat == 1 else f"{name}-{repeat}"


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
            baseline: tuple[nn.Module, dict[str, Any]] | None = None) -> tuple[dict[str, Any], nn.Module]:
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
    ctx_base = dict(task=task, out_dir=out_dir, log_dir=log_dir, data_dir=data_dir, device=device)
    wants_baseline = any("baseline" in teacher_roles(s.config) for s in recipe.steps)
    kept_baseline: nn.Module | None = None

    def finish_step(index: int, step: Step | None, model: nn.Module, t0: float,
                    extra: dict[str, Any] | None = None) -> None:
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
            metrics["steps"].append(row)
            for obs in observers:
                obs.step_done(index, row, metrics)
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
        if recipe.train is not None and not recipe.model.pretrained:
            ctx = Session(workdir=_first(observers, "workdir", 0), **ctx_base)
            model = ctx.train(model, recipe.train, desc="baseline")
        finish_step(0, None, model, t0)
    if wants_baseline and done_index is None:
        kept_baseline = copy.deepcopy(model)

    # -- compression steps -----------------------------------------------------------------
    for i, step in enumerate(recipe.steps, start=1):
        t0 = time.perf_counter()
        row = _first(observers, "finished_row", i)
        if row is not None:
            done_index = i
            metrics["steps"].append(row)
            log.info("resume: step %s already done", step_dirname(i, step))
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
        finish_step(i, step, model, t0, ctx.info.get("metrics"))

    if done_index is not None:  # every step had finished before: the last one's model
        model = _first(observers, "load_model", done_index)
    if main:
        for obs in observers:
            obs.run_done(metrics, model)
    tsdist.barrier()
    return metrics, model


class OutputDir(RunObserver):
    """The observer that makes a run an output directory (CONTRACT section 5).

    It works in ``.DIR.partial``: per-step ``steps/NN-NAME/{model,step.json}`` checkpoints and
    training checkpoints, ``metrics.json`` rewritten after every step, then ``model/``, the
    report, and the rename to ``DIR``. With ``resume`` it answers for the steps a failed run
    finished. Only rank 0 writes.
    """

    def __init__(self, recipe: Recipe, out: Path, partial: Path, resume: bool,
                 preprocessing: dict[str, Any] | None = None) -> None:
        self.recipe, self.out, self.partial, self.resume = recipe, out, partial, resume
        self.preprocessing = preprocessing   # the task's, recorded in every saved artifact

    def _dir(self, index: int) -> Path:
        step = None if index == 0 else self.recipe.steps[index - 1]
        return self.partial / "steps" / step_dirname(index, step)

    def finished_row(self, index: int) -> dict[str, Any] | None:
        f = self._dir(index) / "step.json"
        return json.loads(f.read_text()) if self.resume and f.is_file() else None

    def load_model(self, index: int) -> nn.Module | None:
        path = self._dir(index) / "model"
        return load(path, trust_code=True) if path.is_dir() else None  # this run's own checkpoints

    def workdir(self, index: int) -> Path:
        return self._dir(index)

    def save_model(self, index: int, model: nn.Module) -> Path:
        sdir = self._dir(index)
        sdir.mkdir(parents=True, exist_ok=True)
        save(model, sdir / "model", extra={"step": sdir.name}, preprocessing=self.preprocessing)
        return sdir / "model"

    def step_done(self, index: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_json(self._dir(index) / "step.json", row)
        write_json(self.partial / "metrics.json", metrics)

    def run_done(self, metrics: dict[str, Any], model: nn.Module) -> None:
        from .report import write_report

        last = self._dir(len(self.recipe.steps)) / "model"
        final = self.partial / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(last, final)
        write_json(self.partial / "metrics.json", metrics)
        write_report(self.partial)
        if self.out.exists():
            self.out.rmdir()  # empty (checked before the run)
        os.replace(self.partial, self.out)


def run_recipe(recipe: Recipe, out: str | os.PathLike, *, data_dir: str | None = None,
               resume: bool = False, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run ``recipe`` into the directory ``out`` (an :class:`OutputDir` observer on
    :func:`execute`); returns the metrics dict (also written to out/metrics.json)."""
    out = Path(out)
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
            problem = (f"--resume: the recipe differs from the one the failed run used ({saved}); "
                       "resume with the same recipe and --set values, or start a new --out")
        else:
            write_text(saved, resolved)
    problem = tsdist.broadcast_object(problem)  # also the barrier before the other ranks go on
    if problem:
        raise UserError(problem)
    (partial / "steps").mkdir(parents=True, exist_ok=True) if main else None
    observers: list[RunObserver] = [OutputDir(recipe, out, partial, resume, task.preprocessing)]
    if on_step:
        observers.append(_Callback(on_step))
    metrics, _ = execute(recipe, task, first_model, data_dir=data_dir, observers=observers,
                         out_dir=partial, log_dir=partial / "logs")
    return metrics
