"""The session a method handler works in: task, device, calibration data, capture, training.

A handler is ``handler(model, config, session) -> nn.Module``. Everything it needs besides the
model and its config comes from the :class:`Session`, so a handler never opens a data loader or
calls ``torch.distributed`` itself:

- ``session.task``, ``session.device`` (the recipe's ``device:``; under torchrun each rank on
  ``cuda:LOCAL_RANK`` when CUDA exists, else the CPU);
- :meth:`Session.calibration_batches`: seeded batches from a named split, the same on every
  rank (GPTQ, SmoothQuant, Taylor and activation importance read these);
- :meth:`Session.capture`: inputs, outputs and gradients of named modules;
- :meth:`Session.sequential`: a layer-by-layer runner for calibration methods that change a
  layer and need the next layer's inputs computed by the changed model (GPTQ);
- :meth:`Session.train`: the one trainer, with plugins (:mod:`torchslim.train.plugins`);
- rank helpers :meth:`Session.all_reduce_sum`, :meth:`Session.broadcast`, ``rank``,
  ``world_size``, ``is_main``.

``StepContext`` is this class's earlier name and stays importable from :mod:`torchslim.pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as tsdist
from .config import ModelRef
from .errors import RecipeError, UserError, did_you_mean
from .modules import eval_mode, find_module
from .progress import Progress
from .specs.tasks import Task, to_device
from .train.config import TrainConfig
from .train.distill import distill_plugins

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """The device a recipe's ``device:`` names for this process.

    ``auto``: CUDA when present (under torchrun ``cuda:LOCAL_RANK``), else CPU; ``cuda`` without
    CUDA is a UserError.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device: {device!r} asked for, but this machine has no CUDA device; use auto or cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.device("cuda", local)


SPLITS = ("train", "val", "test")


def _named(model: nn.Module, name: str) -> nn.Module:
    """Module ``name`` of ``model``; RecipeError with the closest names when there is none."""
    return find_module(model, name)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, task: Task, batches: Sequence[Any]) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` as the exact
    average over ``batches`` (cumulative moving average, ``momentum=None``), with every other
    module in eval mode (dropout off) and no weight changed; returns the number of layers.

    After pruning or quantization the activations' statistics shift while BatchNorm still
    normalizes with the old ones; re-estimating them alone recovers much of the accuracy
    (Nagel et al., "A White Paper on Neural Network Quantization", 2021, sec. 3.3; the
    procedure of ``torch.optim.swa_utils.update_bn``, Izmailov et al., 2018). Training mode
    flags and momenta are restored afterwards.

    Raises
    ------
    UserError
        When ``batches`` is empty.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    if not batches:
        raise UserError("BatchNorm re-calibration: no batches to estimate the statistics from")
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            task.forward(model, batch)
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, flag in flags.items():
            m.training = flag
    return len(norms)


class _Captured(dict):
    """``{module name: {"inputs": [...], "outputs": [...], "grads": [...]}}`` of a capture."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


@dataclass
class Session:
    """What a handler may use besides the model and its config.

    Attributes
    ----------
    task : Task or None
        The recipe's task (None when a method is applied without one).
    device : torch.device
        Where the model lives and computes.
    workdir : Path or None
        This step's scratch directory (training checkpoints); None outside a pipeline.
    out_dir : Path or None
        The run's output directory being written (for export).
    final_dir : Path or None
        Where ``out_dir`` is renamed to when the run succeeds (:meth:`final_path`).
    log_dir : Path or None
        TensorBoard directory.
    data_dir : str or None
    info : dict
        A handler's own figures for the step's metrics row: ``info["metrics"] = {...}``.
    warnings : list of dict
        ``{"code", "message"}`` of what :meth:`warn` reported; the pipeline puts them in the
        step's row (``warnings``), the report shows them in a banner.
    baseline : callable or None
        Returns the recipe's baseline model (a fresh copy each call): the ``baseline`` teacher.
    step_input : nn.Module or None
        A copy of the model as it entered the step, kept when the config asks for the
        ``current`` teacher.
    """

    task: Task | None = None
    workdir: Path | None = None
    out_dir: Path | None = None
    log_dir: Path | None = None
    data_dir: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    baseline: Callable[[], nn.Module] | None = None
    step_input: nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    warnings: list[dict[str, str]] = field(default_factory=list)
    final_dir: Path | None = None

    def final_path(self, path: str | os.PathLike) -> Path:
        """``path`` (inside :attr:`out_dir`) as it will be named once the run succeeds: what a
        log line should show, since ``out_dir`` is a temporary sibling renamed at the end."""
        path = Path(path)
        if self.out_dir is not None and self.final_dir is not None and path.is_relative_to(self.out_dir):
            return Path(self.final_dir) / path.relative_to(self.out_dir)
        return path

    def warn(self, code: str, message: str) -> None:
        """Report something the user must see (a layer pruned away, a collapsed metric): logged
        at WARNING level and recorded in the step's row as ``{"code": code, "message": message}``."""
        log.warning("%s", message)
        self.warnings.append({"code": code, "message": message})

    def recalibrate_batchnorm(self, model: nn.Module, samples: int = 512, batch_size: int = 64) -> int:
        """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` from
        ``samples`` training examples (:meth:`calibration_batches`, seed 0); returns the number
        of BatchNorm layers updated (0: none, nothing is run). See :func:`recalibrate_batchnorm`."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return 0
        task = self.require_task("BatchNorm re-calibration")
        return recalibrate_batchnorm(model, task, self.calibration_batches(samples, batch_size=batch_size))

    # -- task and teachers ---------------------------------------------------------------
    def require_task(self, what: str) -> Task:
        if self.task is None:
            raise UserError(f"{what} needs a task with data; pass task=... (e.g. 'digits')")
        return self.task

    def teacher(self, ref: str | ModelRef) -> nn.Module:
        """The model a teacher reference names: ``baseline``, ``current`` or a ModelRef."""
        if isinstance(ref, ModelRef):
            return ref.build().to(self.device)
        found = self.baseline() if ref == "baseline" and self.baseline else (
            self.step_input if ref == "current" else None)
        if found is None:
            raise UserError(f"teacher {ref!r} is not available here: give a model spec as teacher")
        return found

    def distill_cache_dir(self, sub: str = "train") -> Path | None:
        """Where a training run ``sub`` of this step keeps cached teacher logits (None outside a
        pipeline: the cache stays in memory)."""
        return self.workdir / sub / "teacher-logits" if self.workdir else None

    # -- calibration data ----------------------------------------------------------------
    def calibration_batches(self, samples: int = 128, *, split: str = "train", batch_size: int = 32,
                            seed: int = 0) -> list[Any]:
        """``samples`` examples of ``split`` drawn without replacement by a generator seeded with
        ``seed`` alone, in batches of ``batch_size``, on :attr:`device`.

        The draw does not depend on the rank, so every process of a torchrun job calibrates on
        the same examples (methods that compute statistics get equal results on every rank).

        Raises
        ------
        UserError
            Without a task, or when the split is empty.
        """
        task = self.require_task("calibration")
        if samples < 1 or batch_size < 1:
            raise RecipeError(f"calibration: samples and batch_size must be >= 1, got {samples}, {batch_size}")
        if split not in SPLITS:
            raise RecipeError(f"calibration: unknown split {split!r}{did_you_mean(split, SPLITS)}; "
                              f"accepted: {', '.join(SPLITS)}")
        ds = task.split(split)
        if len(ds) == 0:
            raise UserError(f"calibration: the {split!r} split of task {task.spec!r} is empty")
        if samples > len(ds):
            log.warning("calibration: %d samples asked for, the %s split of %s has %d: using all of them",
                        samples, split, task.spec, len(ds))
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=gen)[: min(samples, len(ds))].tolist()
        return [to_device(task.collate([ds[i] for i in idx[k:k + batch_size]]), self.device)
                for k in range(0, len(idx), batch_size)]

    # -- activations and gradients -------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, model: nn.Module, names: Sequence[str], *, inputs: bool = True,
                outputs: bool = False, grads: bool = False) -> Iterator[_Captured]:
        """Record, for each named module, its inputs (the first positional argument), outputs
        and output gradients during the forward/backward passes run inside the block.

        Tensors are detached and kept where they were computed. Hooks are removed on exit. The
        model runs in whatever mode it is in: call ``model.eval()`` first for calibration
        statistics (no dropout, no BatchNorm updates), keep train mode for gradients of training.

        Examples
        --------
        >>> import torchslim
        >>> m = torchslim.build_model("zoo:lenet-300-100")
        >>> with Session().capture(m, ["1"], outputs=True) as got:
        ...     _ = m(torch.zeros(2, 1, 28, 28))
        >>> got["1"]["inputs"][0].shape, got["1"]["outputs"][0].shape
        (torch.Size([2, 784]), torch.Size([2, 300]))
        """
        got = _Captured({n: {"inputs": [], "outputs": [], "grads": []} for n in names})
        handles = []
        for name in names:
            module = _named(model, name)

            def fwd(mod, args, out, name=name):
                if inputs and args:
                    got[name]["inputs"].append(args[0].detach())
                if outputs:
                    got[name]["outputs"].append(out.detach() if isinstance(out, torch.Tensor) else out)
                if grads and isinstance(out, torch.Tensor) and out.requires_grad:
                    # d(loss)/d(output), recorded when backward reaches this output
                    out.register_hook(lambda g, name=name: got[name]["grads"].append(g.detach()))

            handles.append(module.register_forward_hook(fwd))
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def sequential(self, model: nn.Module, names: Sequence[str], batches: Sequence[Any],
                   fn: Callable[[str, nn.Module, list[torch.Tensor]], None]) -> None:
        """Layer by layer, in the order given: collect the inputs that ``batches`` bring to
        module ``name`` through the model *as changed so far*, then call
        ``fn(name, module, inputs)``, which may change that module in place.

        Each forward stops right after the wanted module (no work past it) and runs in eval mode
        under ``no_grad`` (no dropout, BatchNorm statistics untouched; the model's mode is
        restored). This is the sequential calibration GPTQ uses (Frantar et al. 2023, sec. 3):
        later layers see the quantization error of earlier ones.
        """
        task = self.require_task("sequential calibration")
        modules = [(name, _named(model, name)) for name in names]   # every name checked first
        bar = Progress(len(modules), "calibration", unit="layer")
        for name, module in modules:
            seen: list[torch.Tensor] = []

            def stop(mod, args, out):
                seen.append(args[0].detach())
                raise _StopForward

            handle = module.register_forward_hook(stop)
            try:
                with torch.no_grad(), eval_mode(model):
                    for batch in batches:
                        try:
                            task.forward(model, batch)
                        except _StopForward:
                            pass
            finally:
                handle.remove()
            fn(name, module, seen)
            bar.update(1)
        bar.close()

    # -- training ------------------------------------------------------------------------
    def train(self, model: nn.Module, config: TrainConfig, *, desc: str, loss_fn: Callable | None = None,
              plugins: list | None = None, callbacks: list | None = None, sub: str = "train") -> nn.Module:
        """Train ``model`` with the shared trainer (checkpoints, resume, DDP, logging);
        ``config.distill`` adds the distillation plugins
        (:func:`~torchslim.train.distill.distill_plugins`). Each epoch is added to the step's
        metrics row as ``training: [{"run": desc, "epoch", "loss", "val_metric", "lr"}]``
        (``val_metric`` null without a validation metric)."""
        from .train.trainer import Trainer

        task = self.require_task(desc)
        plugins = list(plugins or [])
        if config.distill is not None:
            plugins += distill_plugins(config.distill, self.teacher, self.distill_cache_dir(sub))
        trainer = Trainer(model, task, config, loss_fn=loss_fn, plugins=plugins, callbacks=callbacks,
                          ckpt_dir=self.workdir / sub if self.workdir else None,
                          log_dir=self.log_dir / desc if self.log_dir else None, desc=desc)
        model = trainer.fit()
        val_key = "val/" + (task.metric_name or "metric")
        curve = self.info.setdefault("metrics", {}).setdefault("training", [])
        curve += [{"run": desc, "epoch": h["epoch"], "loss": round(float(h["train/loss"]), 6),
                   "val_metric": None if h.get(val_key) is None else round(float(h[val_key]), 6),
                   "lr": float(h["train/lr"])} for h in trainer.history]
        return model

    # -- ranks ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return tsdist.rank()

    @property
    def world_size(self) -> int:
        return tsdist.world_size()

    @property
    def is_main(self) -> bool:
        return tsdist.is_main()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor; the input when
        not distributed). Statistics gathered on each rank's data are combined so."""
        if tsdist.world_size() <= 1:
            return tensor
        import torch.distributed as dist
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank (any picklable object)."""
        return tsdist.broadcast_object(obj)

    def barrier(self) -> None:
        tsdist.barrier()

