"""Run a recipe: baseline, then each step; measure, checkpoint and report every one.

Output layout (CONTRACT section 5). The run works in a temporary sibling ``.DIR.partial`` and
renames it to ``DIR`` when everything is written; a failed run keeps the sibling, whose
``steps/NN-NAME/`` checkpoints ``--resume`` continues from (inside a step, the trainer resumes
from its last epoch checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as tsdist
from ._version import __version__
from .artifact import load, save
from .errors import RecipeError, UserError
from .measure import check_runs, measure
from .recipe import Recipe, Step
from .registry import get_method
from .specs.models import build_model
from .specs.tasks import Task, build_task
from .train.config import TrainConfig
from .train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a handler may use besides the model and its config.

    Attributes
    ----------
    task : Task or None
        The recipe's task (None when a method is applied without one).
    workdir : Path or None
        This step's scratch directory (training checkpoints); None outside a pipeline.
    out_dir : Path or None
        The run's output directory being written (for export).
    log_dir : Path or None
        TensorBoard directory.
    data_dir : str or None
    """

    task: Task | None = None
    workdir: Path | None = None
    out_dir: Path | None = None
    log_dir: Path | None = None
    data_dir: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def require_task(self, what: str) -> Task:
        if self.task is None:
            raise UserError(f"{what} needs a task with data; pass task=... (e.g. 'digits')")
        return self.task

    def train(self, model: nn.Module, config: TrainConfig, *, desc: str, loss_fn: Callable | None = None,
              callbacks: list | None = None, sub: str = "train") -> nn.Module:
        task = self.require_task(desc)
        return Trainer(model, task, config, loss_fn=loss_fn, callbacks=callbacks,
                       ckpt_dir=self.workdir / sub if self.workdir else None,
                       log_dir=self.log_dir / desc if self.log_dir else None, desc=desc).fit()


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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


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
        isinstance(s.config, TrainConfig) or getattr(s.config, "finetune", None) is not None
        for s in recipe.steps)
    if trains or task.metric_name is not None:
        task.split("train")  # missing or broken data files fail here, as does a task without data
    if task.metric_name is not None:
        task.split("test")
    if recipe.train is not None:
        try:
            recipe.train.check_ready(task)
        except UserError as exc:
            raise type(exc)(recipe.locate(f"train.{exc}")) from None
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
        if step.verb in ("distill", "merge"):
            model_known = False  # later steps target a model that does not exist yet
        for key in ("targets", "ignore"):
            patterns = getattr(step.config, key, ())
            if patterns and model_known:
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


def run_recipe(recipe: Recipe, out: str | os.PathLike, *, data_dir: str | None = None,
               resume: bool = False, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run ``recipe`` into ``out``; returns the metrics dict (also written to out/metrics.json)."""
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
            saved.write_text(resolved)
    problem = tsdist.broadcast_object(problem)  # also the barrier before the other ranks go on
    if problem:
        raise UserError(problem)
    (partial / "steps").mkdir(parents=True, exist_ok=True) if main else None

    metrics: dict[str, Any] = {
        "schema_version": 1, "torchslim_version": __version__, "model": recipe.model.spec,
        "task": recipe.task, "environment": environment(), "steps": []}
    ctx_base = dict(task=task, out_dir=partial, log_dir=partial / "logs", data_dir=data_dir)

    def finish_step(index: int, step: Step | None, model: nn.Module, t0: float,
                    extra: dict[str, Any] | None = None) -> None:
        sdir = partial / "steps" / step_dirname(index, step)
        if main:
            sdir.mkdir(parents=True, exist_ok=True)
            save(model, sdir / "model", extra={"step": step_dirname(index, step)})
            row = {"name": step_name(recipe, index),
                   "verb": "baseline" if step is None else step.verb,
                   "method": None if step is None else step.method}
            row.update(measure(model, task, batch_sizes=recipe.measure.batch_sizes,
                               artifact_dir=sdir / "model"))
            row.update(extra or {})  # a handler's own figures, e.g. ONNX Runtime latency
            row["wall_s"] = round(time.perf_counter() - t0, 3)
            if step is not None:
                row["config"] = step.config.to_dict()
            _write_json(sdir / "step.json", row)
            metrics["steps"].append(row)
            _write_json(partial / "metrics.json", metrics)
            if on_step:
                on_step(row)
        tsdist.barrier()

    def done_row(index: int, step: Step | None) -> dict | None:
        f = partial / "steps" / step_dirname(index, step) / "step.json"
        return json.loads(f.read_text()) if f.is_file() else None

    # -- baseline --------------------------------------------------------------------------
    t0 = time.perf_counter()
    row = done_row(0, None) if resume else None
    done_model: Path | None = None  # a finished step's artifact, loaded only if a later step needs it
    if row is not None:
        done_model = partial / "steps" / step_dirname(0, None) / "model"
        metrics["steps"].append(row)
        log.info("resume: baseline already done")
    else:
        model = first_model
        if recipe.train is not None and not recipe.model.pretrained:
            ctx = StepContext(workdir=partial / "steps" / step_dirname(0, None), **ctx_base)
            model = ctx.train(model, recipe.train, desc="baseline")
        finish_step(0, None, model, t0)

    # -- compression steps -----------------------------------------------------------------
    for i, step in enumerate(recipe.steps, start=1):
        t0 = time.perf_counter()
        name = step_dirname(i, step)
        row = done_row(i, step) if resume else None
        if row is not None:
            done_model = partial / "steps" / name / "model"
            metrics["steps"].append(row)
            log.info("resume: step %s already done", name)
            continue
        if done_model is not None:
            model, done_model = load(done_model, trust_code=True), None  # this run's own checkpoints
        log.info("step %d/%d: %s", i, len(recipe.steps), step.key)
        ctx = StepContext(workdir=partial / "steps" / name, **ctx_base)
        if step.verb != "export" or main:  # export only writes files, which rank 0 alone does
            model = apply_step(model, step, ctx)
        finish_step(i, step, model, t0, ctx.info.get("metrics"))

    # -- final outputs ---------------------------------------------------------------------
    if main:
        last = partial / "steps" / step_dirname(len(recipe.steps), recipe.steps[-1] if recipe.steps else None)
        final = partial / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(last / "model", final)
        _write_json(partial / "metrics.json", metrics)
        from .report import write_report
        write_report(partial)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(partial, out)
    tsdist.barrier()
    return metrics
