"""The one training loop: baseline training, fine-tuning after compression, and distillation.

- optimizers SGD (momentum) / AdamW; schedules constant, step, cosine, onecycle, plateau, with
  linear warm-up; weight decay, label smoothing, gradient clipping, dropout override;
- early stopping on the validation metric, restoring the best weights;
- a checkpoint after every epoch (``ckpt_dir/last.pt``), resumed automatically when present; a
  resumed run ends with exactly the weights of an uninterrupted one (every epoch's shuffling and
  dropout are seeded from ``(seed, epoch, rank)`` alone);
- data-parallel under torchrun (DDP + DistributedSampler; rank 0 logs and writes);
- training plugins (:mod:`torchslim.train.plugins`): extra loss terms (distillation), extra
  trainable parameters, hooks after each optimizer step (pruning masks, gradual schedules), state
  saved with each checkpoint;
- TensorBoard event files in ``log_dir`` (and MLflow / Weights & Biases when installed and named).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed as tsdist
from ..errors import ArtifactError, UserError
from ..fileio import atomic_path
from ..modules import eval_mode, weight_names
from ..progress import Progress, emit
from ..specs.tasks import Task, _device_of, to_device
from .config import TrainConfig
from .plugins import CallbackPlugin, TrainingPlugin

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[nn.Module, int, int], None]   # (model, global_step, total_steps)

CKPT_FORMAT = 3   # bump when the content of last.pt changes (3: "plugins" state)


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high, most often)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators.

    Examples
    --------
    >>> seed_everything(3); a = torch.rand(2)
    >>> seed_everything(3); torch.equal(a, torch.rand(2))
    True
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def jitter_images(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) shifted by its own random offset in
    ``[-pixels, pixels]`` along H and along W, edges replicated; same shape and dtype.

    The input "jitter" of Hinton et al. (2015, sec. 3) for their MNIST teacher. Offsets come from
    the global torch generator, which the trainer seeds per epoch, so resumed runs repeat.
    """
    if pixels <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pixels, pixels, pixels, pixels), mode="replicate")
    dy = torch.randint(0, 2 * pixels + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * pixels + 1, (n,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]     # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]     # (N, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def mix_seed(*parts: int) -> int:
    """A well-spread non-negative 63-bit seed from integers such as ``(seed, epoch, rank)``.

    Plain ``seed + epoch`` would make seed 1 replay seed 0's shuffles one epoch later.

    Examples
    --------
    >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
    True
    """
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Factor of ``cfg.lr`` used by optimizer step ``step`` (0-based) for constant/step/cosine."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(cfg.warmup * steps_per_epoch)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(total - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if cfg.schedule == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0
    return f


class Trainer:
    """Train ``model`` on ``task`` as ``config`` says.

    Parameters
    ----------
    model : nn.Module
        Trained in place, on the device it is on.
    task : Task
        Supplies splits, forward, loss and the validation metric.
    config : TrainConfig
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> loss``; default is the task loss (with label smoothing) of
        ``task.forward``'s outputs.
    plugins : list of TrainingPlugin, optional
        Loss terms, extra parameters, after-step hooks and checkpointed state
        (see :mod:`torchslim.train.plugins`), applied in list order.
    callbacks : list of callables, optional
        ``cb(model, global_step, total_steps)`` after each optimizer step (on the bare model),
        each wrapped as a :class:`~torchslim.train.plugins.CallbackPlugin` after ``plugins``.
        A callback with ``state_dict()`` / ``load_state_dict()`` has its state checkpointed
        (tensors and plain containers only: the checkpoint is read with ``weights_only=True``).
    ckpt_dir : path, optional
        Where ``last.pt`` is written after each epoch and resumed from.
    log_dir : path, optional
        TensorBoard event files.
    desc : str, default="train"
        Name used in logs, progress bars and errors.

    Attributes
    ----------
    history : list of dict
        One entry per epoch: ``epoch``, ``train/loss``, ``train/lr`` and ``val/<metric>``.
    optimizer, scheduler
        Set by :meth:`fit` (callbacks may read the current learning rate from ``optimizer``).

    Raises
    ------
    TrainingDivergedError
        When the loss becomes NaN or infinite.
    ArtifactError
        When ``ckpt_dir/last.pt`` cannot be read or belongs to another configuration or model.

    Notes
    -----
    The learning rate of ``schedule: plateau`` is divided by ``1/gamma`` after 2 epochs without
    improvement of the validation metric (``ReduceLROnPlateau`` with ``patience=1``).
    Resuming needs the same configuration and the same number of processes (the schedule is
    counted in optimizer steps).

    Examples
    --------
    >>> import torchslim
    >>> torch.manual_seed(0) and None
    >>> model = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    >>> task = torchslim.build_task("digits")
    >>> t = Trainer(model, task, TrainConfig(epochs=2, lr=0.05, loggers=()))
    >>> _ = t.fit()
    >>> [h["epoch"] for h in t.history]
    [1, 2]
    """

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig, *,
                 loss_fn: LossFn | None = None, plugins: list[TrainingPlugin] | None = None,
                 callbacks: list[StepCallback] | None = None,
                 ckpt_dir: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                 desc: str = "train") -> None:
        self.model, self.task, self.cfg = model, task, config
        self.custom_loss = loss_fn
        self.plugins: list[TrainingPlugin] = [*(plugins or []), *(CallbackPlugin(cb) for cb in callbacks or [])]
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.desc = desc
        self.history: list[dict[str, float]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    # -- pieces --------------------------------------------------------------------------
    def loss_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch: the task loss (or ``loss_fn``), then each plugin's."""
        if self.custom_loss is not None:
            outputs, loss = None, self.custom_loss(model, batch)
        else:
            outputs = self.task.forward(model, batch)
            loss = self.task.loss(outputs, batch, label_smoothing=self.cfg.label_smoothing)
        for plugin in self.plugins:
            loss = plugin.loss(model, batch, outputs, loss)
        return loss

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        c = self.cfg
        if c.schedule == "onecycle":
            # warm-up (at least 5% of the run) is the rising half of the cycle
            return torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=c.lr, total_steps=max(c.epochs * steps_per_epoch, 1),
                pct_start=min(max(c.warmup / max(c.epochs, 1), 0.05), 0.95))
        if c.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max" if self.task.higher_is_better else "min", factor=c.gamma, patience=1)
        return torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c, steps_per_epoch))

    def _loggers(self) -> list[Any]:
        if not tsdist.is_main() or self.log_dir is None:
            return []
        out: list[Any] = []
        for name in self.cfg.loggers:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter
                    out.append(("tensorboard", SummaryWriter(log_dir=str(self.log_dir))))
                elif name == "mlflow":
                    import mlflow
                    out.append(("mlflow", mlflow))
                elif name == "wandb":
                    import wandb
                    out.append(("wandb", wandb.init(project="torchslim", dir=str(self.log_dir),
                                                    reinit=True)))
            except ImportError:
                raise UserError(f"train.loggers names {name!r}, which is not installed "
                                f"(pip install {name})") from None
        return out

    @staticmethod
    def _log(loggers: list[Any], values: dict[str, float], step: int) -> None:
        for kind, lg in loggers:
            if kind == "tensorboard":
                for k, v in values.items():
                    lg.add_scalar(k, v, step)
                lg.flush()
            elif kind == "mlflow":
                lg.log_metrics(values, step=step)
            elif kind == "wandb":
                lg.log(values, step=step)

    def _validate(self, model: nn.Module) -> float | None:
        if self.task.metric_name is None:
            return None
        return self.task.evaluate(model, split="val")

    def _better(self, a: float, b: float | None) -> bool:
        if b is None:
            return True
        return a > b if self.task.higher_is_better else a < b

    def _fingerprint(self) -> dict[str, Any]:
        """The configuration a checkpoint must match to be resumed (loggers do not matter)."""
        return {k: v for k, v in self.cfg.to_dict().items() if k != "loggers"}

    # -- checkpoint ----------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (temp file, then ``os.replace``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self, path: Path, steps_per_epoch: int) -> dict[str, Any]:
        """Read and check ``last.pt``; every error says how to start the run over."""
        again = f"delete {path} to restart this training from epoch 1"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, foreign or unsafe pickle
            why = (str(exc).strip().splitlines() or [""])[0][:160]
            raise ArtifactError(f"{self.desc}: cannot read the training checkpoint {path} "
                                f"({type(exc).__name__}: {why}); {again}") from None
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ArtifactError(f"{self.desc}: {path} is not a torchslim training checkpoint of "
                                f"format {CKPT_FORMAT} (found {found!r}); {again}")
        saved, now = state["config"], self._fingerprint()
        if saved != now:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ArtifactError(f"{self.desc}: {path} was written with another training "
                                f"configuration ({diff}); resume with the same configuration or {again}")
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ArtifactError(
                f"{self.desc}: {path} was written by a run with {state['steps_per_epoch']} steps per "
                f"epoch ({state['world_size']} process(es)); this run has {steps_per_epoch} "
                f"({tsdist.world_size()} process(es)); resume with the same number of processes or {again}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ArtifactError(f"{self.desc}: {path} does not fit this model "
                                f"({first[0] if first else exc}); {again}") from None
        return state

    def _has_unused_params(self, params: list[nn.Parameter], dataset, device: torch.device) -> bool:
        """Whether some trainable parameter gets no gradient from the loss (BERT's pooler under
        mean pooling, say). DDP must then be told, or it waits for those gradients forever.
        Probed with one eval-mode forward/backward; RNG state, weights and statistics untouched."""
        batch = to_device(self.task.collate([dataset[i] for i in range(min(2, len(dataset)))]), device)
        with torch.random.fork_rng(devices=[]), eval_mode(self.model):
            try:
                self.loss_fn(self.model, batch).backward()
                unused = any(p.grad is None for p in params)
            finally:
                for p in params:
                    p.grad = None
        return unused

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        """Train (or resume training) and return the model; see the class docstring."""
        c = self.cfg
        model = self.model
        self.history = []
        if c.epochs == 0:
            return model
        seed_everything(c.seed)
        if c.dropout is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = c.dropout
        world, rank = tsdist.world_size(), tsdist.rank()
        dataset = self.task.split("train")
        if len(dataset) == 0:
            raise UserError(f"{self.desc}: the training split of task {self.task.spec!r} is empty")
        # each rank reads a disjoint 1/world of every epoch (DistributedSampler pads to equal shares)
        sampler = DistributedSampler(dataset, shuffle=True, seed=c.seed) if world > 1 else None
        gen = torch.Generator() if sampler is None else None
        loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=sampler is None,
                            sampler=sampler, generator=gen, collate_fn=self.task.collate,
                            drop_last=len(dataset) > c.batch_size * world)
        if c.jitter:
            first = dataset[0][0] if isinstance(dataset[0], (tuple, list)) else None
            if not (isinstance(first, torch.Tensor) and first.dim() == 3 and first.is_floating_point()):
                raise UserError(f"{self.desc}: jitter: {c.jitter} shifts images (C, H, W), but the examples of "
                                f"task {self.task.spec!r} are not float images; set jitter: 0")
        steps_per_epoch = len(loader)
        if world > 1 and rank == 0:
            log.info("%s: %d processes x batch_size %d = effective batch size %d (%d steps per epoch); "
                     "lr %g is not rescaled", self.desc, world, c.batch_size, world * c.batch_size,
                     steps_per_epoch, c.lr)
        total_steps = c.epochs * steps_per_epoch
        warm = int(c.warmup * steps_per_epoch)
        for plugin in self.plugins:
            plugin.setup(self)
        params = [p for p in model.parameters() if p.requires_grad]
        extra = [p for plugin in self.plugins for p in plugin.parameters() if p.requires_grad]
        if not params:
            raise UserError(f"{self.desc}: nothing to train: the model has no trainable parameters")
        opt = self.optimizer = self._optimizer(params + extra)
        sched = self.scheduler = self._scheduler(opt, steps_per_epoch)
        device = _device_of(model)

        start_epoch, best_metric, best_state, bad_epochs = 0, None, None, 0
        ckpt = self.ckpt_dir / "last.pt" if self.ckpt_dir else None
        if ckpt is not None and ckpt.is_file():
            state = self._load_checkpoint(ckpt, steps_per_epoch)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            for plugin, pl_state in zip(self.plugins, state["plugins"]):
                if pl_state is not None:
                    plugin.load_state_dict(pl_state)
            start_epoch = c.epochs if state["stopped"] else state["epoch"] + 1
            best_metric, best_state = state["best_metric"], state["best_state"]
            bad_epochs = state["bad_epochs"]
            self.history = list(state["history"])
            if tsdist.is_main():
                log.info("%s: resumed from %s after epoch %d/%d", self.desc, ckpt, state["epoch"] + 1,
                         c.epochs)

        ddp_model: nn.Module = model
        if world > 1:
            # DDP broadcasts rank 0's parameters and buffers, then averages gradients
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self._has_unused_params(params, dataset, device))
        loggers = self._loggers()
        step = start_epoch * steps_per_epoch
        bar = Progress(total_steps, self.desc, initial=step, enabled=tsdist.is_main())
        try:
            for epoch in range(start_epoch, c.epochs):
                # the epoch's randomness depends on (seed, epoch, rank) only, so a resumed run
                # shuffles and drops out exactly like an uninterrupted one
                seed_everything(mix_seed(c.seed, epoch, rank))
                if sampler is not None:
                    sampler.set_epoch(epoch)
                else:
                    gen.manual_seed(mix_seed(c.seed, epoch))
                ddp_model.train()
                running, seen, lr = 0.0, 0, opt.param_groups[0]["lr"]
                for batch in loader:
                    if c.schedule == "plateau" and warm and step <= warm:
                        for g in opt.param_groups:  # linear warm-up; then the plateau rule decides
                            g["lr"] = c.lr * min((step + 1) / warm, 1.0)
                    lr = opt.param_groups[0]["lr"]
                    batch = to_device(batch, device)
                    if c.jitter:
                        batch = (jitter_images(batch[0], c.jitter), *batch[1:])
                    loss = self.loss_fn(ddp_model, batch)
                    if not torch.isfinite(loss):
                        from ..numerics import nonfinite_tensors

                        bad = nonfinite_tensors(model, limit=3)
                        if bad:  # the weights were broken before: no learning rate fixes that
                            raise TrainingDivergedError(
                                f"{self.desc}: the training loss is {loss.item()} at epoch {epoch + 1}, step "
                                f"{step + 1} because weights are non-finite: "
                                + ", ".join(f"{n} ({nan} NaN, {inf} inf)" for n, nan, inf in bad)
                                + ("; they were so before training (check the weights file or the earlier step)"
                                   if step == 0 else "; training diverged: lower lr, add warmup, or set grad_clip"))
                        raise TrainingDivergedError(
                            f"{self.desc}: the training loss became {loss.item()} at epoch {epoch + 1}, "
                            f"step {step + 1} (lr {lr:.3g}); lower lr (now {c.lr}), add warmup, "
                            "or set grad_clip")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if world > 1 and extra:  # DDP averages the model's gradients, not the plugins'
                        tsdist.all_reduce_mean_([p.grad for p in extra if p.grad is not None])
                    if c.grad_clip is not None:
                        nn.utils.clip_grad_norm_(params + extra, c.grad_clip)
                    opt.step()
                    if c.schedule != "plateau":
                        sched.step()
                    step += 1
                    for plugin in self.plugins:
                        plugin.after_step(model, step, total_steps)
                    n = len(self.task.targets(batch))
                    running += float(loss.detach()) * n
                    seen += n
                    bar.update(1, epoch=f"{epoch + 1}/{c.epochs}", loss=running / max(seen, 1))
                running, seen = tsdist.all_reduce_sum([running, seen])  # the loss over all ranks
                val = self._validate(model)
                record = {"train/loss": running / max(seen, 1), "train/lr": lr}
                if val is not None:
                    record["val/" + (self.task.metric_name or "metric")] = val
                self.history.append({"epoch": epoch + 1, **record})
                self._log(loggers, record, epoch + 1)
                if c.schedule == "plateau" and val is not None and step >= warm:
                    sched.step(val)
                stop = False
                if val is not None and c.early_stopping:
                    if self._better(val, best_metric):
                        best_metric, bad_epochs = val, 0
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        bad_epochs += 1
                    stop = bad_epochs >= c.early_stopping
                if ckpt is not None and tsdist.is_main():
                    self._save_checkpoint(ckpt, {
                        "format": CKPT_FORMAT, "config": self._fingerprint(), "epoch": epoch,
                        "steps_per_epoch": steps_per_epoch, "world_size": world, "stopped": stop,
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "best_metric": best_metric,
                        "best_state": best_state, "bad_epochs": bad_epochs, "history": self.history,
                        "plugins": [plugin.state_dict() for plugin in self.plugins]})
                tsdist.barrier()
                if tsdist.is_main():
                    log.info("%s epoch %d/%d loss %.4f%s", self.desc, epoch + 1, c.epochs,
                             record["train/loss"], f" val {val:.4f}" if val is not None else "")
                    emit("epoch", desc=self.desc, epoch=epoch + 1, epochs=c.epochs, **record)
                if stop:
                    if tsdist.is_main():
                        log.info("%s: early stop after epoch %d (best val %.4f)", self.desc,
                                 epoch + 1, best_metric)
                    break
        finally:
            bar.close()
            for kind, lg in loggers:
                if kind == "tensorboard":
                    lg.close()
            for plugin in self.plugins:
                plugin.teardown()
        if best_state is not None and c.early_stopping:
            model.load_state_dict(best_state)
        return model


def train(model: nn.Module, task: Task, config: TrainConfig | None = None, **kwargs: Any) -> nn.Module:
    """Train ``model`` in place and return it (see :class:`Trainer` for keyword arguments).

    Examples
    --------
    >>> import torchslim
    >>> model = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 16})
    >>> train(model, torchslim.build_task("digits"), TrainConfig(epochs=1, loggers=())) is model
    True
    """
    return Trainer(model, task, config or TrainConfig(), **kwargs).fit()


def short_finetune(model: nn.Module, task: Task, steps: int, lr: float = 0.01, batch_size: int = 64,
                   momentum: float = 0.9, seed: int = 0, hold_zeros: bool = True,
                   schedule: str = "cosine") -> nn.Module:
    """``steps`` SGD steps (momentum; ``lr`` decayed to 0 by a cosine over the steps, or kept
    ``constant``) of ``task``'s loss on its training split,
    in place, on one process, with no checkpoint and no log: the "short-term fine-tune" NetAdapt
    gives each candidate before measuring its accuracy (Yang et al., "NetAdapt", ECCV 2018,
    sec. 3.2), used by sensitivity curves that account for recovery. Batches are drawn from a
    shuffle seeded with ``seed`` (the training split cycled when ``steps`` passes its end). With
    ``hold_zeros`` every weight tensor (:func:`~torchslim.modules.weight_names`; not biases or
    norm scales) keeps its zeros after each step, so pruned weights do not grow back. The model
    is left in eval mode, without gradients; the caller's random state (CPU, and the model's GPU)
    is as it was; returns the model.

    Raises
    ------
    ValueError
        For a ``batch_size`` below 1 or an unknown ``schedule``.
    UserError
        When the training split is empty.
    TrainingDivergedError
        When the loss becomes NaN or infinite (``lr`` too high).
    """
    if schedule not in ("cosine", "constant") or batch_size < 1:
        raise ValueError(f"short_finetune: schedule must be cosine or constant and batch_size >= 1, got "
                         f"{schedule!r} and {batch_size}")
    if steps <= 0:
        return model
    dataset = task.split("train")
    if len(dataset) == 0:
        raise UserError(f"short fine-tune: the training split of task {task.spec!r} is empty")
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=task.collate,
                        drop_last=len(dataset) > batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    # decayed to 0, the steps end in a minimum: a constant rate leaves the model wherever its
    # last noisy step took it, and every point of a curve moves by that noise
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))) if schedule == "cosine" else 1.0)
    held = [(w, w != 0) for m in model.modules() for w in (getattr(m, n) for n in weight_names(m))
            if hold_zeros and w.requires_grad and bool((w == 0).any())]
    model.train()
    done = 0
    gpu = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu):
        torch.random.default_generator.manual_seed(seed)  # dropout, on the CPU and the model's GPU alone
        if gpu:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        while done < steps:
            for batch in loader:
                batch = to_device(batch, device)
                loss = task.loss(task.forward(model, batch), batch)
                if not torch.isfinite(loss):
                    model.eval()
                    raise TrainingDivergedError(f"short fine-tune: the loss became {loss.item()} at step "
                                                f"{done + 1}/{steps}; lower the learning rate (lr {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for w, keep in held:
                        w.mul_(keep)
                done += 1
                if done >= steps:
                    break
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model
