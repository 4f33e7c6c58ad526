"""The one training loop: baseline training, fine-tuning after compression, and distillation.

- optimizers SGD (momentum) / AdamW; schedules constant, step, cosine, onecycle, plateau, with
  linear warm-up; weight decay, label smoothing, gradient clipping, dropout override;
- early stopping on the validation metric, restoring the best weights;
- a checkpoint after every epoch (``ckpt_dir/last.pt``), resumed automatically when present;
- data-parallel under torchrun (DDP + DistributedSampler; rank 0 logs and writes);
- callbacks after each optimizer step (pruning masks, gradual schedules);
- TensorBoard event files in ``log_dir`` (and MLflow / Weights & Biases when installed and named).
"""

from __future__ import annotations

import copy
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
from tqdm.auto import tqdm

from .. import distributed as tsdist
from ..errors import UserError
from ..specs.tasks import Task, _device_of, to_device
from .config import TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[nn.Module, int, int], None]   # (model, global_step, total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
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
        Trained in place.
    task : Task
        Supplies splits, forward, loss and the validation metric.
    config : TrainConfig
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> loss``; default is the task loss (with label smoothing).
    callbacks : list of callables, optional
        ``cb(model, global_step, total_steps)`` after each optimizer step (on the bare model).
    ckpt_dir : path, optional
        Where ``last.pt`` is written after each epoch and resumed from.
    log_dir : path, optional
        TensorBoard event files.
    """

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig, *,
                 loss_fn: LossFn | None = None, callbacks: list[StepCallback] | None = None,
                 ckpt_dir: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                 desc: str = "train") -> None:
        self.model, self.task, self.cfg = model, task, config
        self.loss_fn = loss_fn or (lambda m, b: task.loss(task.forward(m, b), b,
                                                          label_smoothing=config.label_smoothing))
        self.callbacks = list(callbacks or [])
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.desc = desc
        self.history: list[dict[str, float]] = []

    # -- pieces --------------------------------------------------------------------------
    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        c = self.cfg
        if c.schedule == "onecycle":
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

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        c = self.cfg
        model = self.model
        if c.epochs == 0:
            return model
        seed_everything(c.seed)
        if c.dropout is not None:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = c.dropout
        world = tsdist.world_size()
        dataset = self.task.split("train")
        sampler = DistributedSampler(dataset, shuffle=True, seed=c.seed) if world > 1 else None
        gen = torch.Generator().manual_seed(c.seed)
        loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=sampler is None,
                            sampler=sampler, generator=gen if sampler is None else None,
                            collate_fn=self.task.collate, drop_last=len(dataset) > c.batch_size * world)
        steps_per_epoch = max(len(loader), 1)
        total_steps = c.epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("nothing to train: the model has no trainable parameters")
        opt = self._optimizer(params)
        sched = self._scheduler(opt, steps_per_epoch)
        device = _device_of(model)

        start_epoch, best_metric, best_state, bad_epochs = 0, None, None, 0
        ckpt = self.ckpt_dir / "last.pt" if self.ckpt_dir else None
        if ckpt is not None and ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, best_metric = state["epoch"] + 1, state.get("best_metric")
            best_state, bad_epochs = state.get("best_state"), state.get("bad_epochs", 0)
            self.history = list(state.get("history", []))
            torch.set_rng_state(state["rng"])
            log.info("%s: resumed from %s at epoch %d/%d", self.desc, ckpt, start_epoch, c.epochs)

        ddp_model: nn.Module = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(model)
        loggers = self._loggers()
        step = start_epoch * steps_per_epoch
        bar = tqdm(total=total_steps, initial=step, desc=self.desc, unit="step", leave=False,
                   disable=None if tsdist.is_main() else True)
        try:
            for epoch in range(start_epoch, c.epochs):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                ddp_model.train()
                running, seen = 0.0, 0
                for batch in loader:
                    batch = to_device(batch, device)
                    loss = self.loss_fn(ddp_model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{self.desc}: loss became {loss.item()} at epoch {epoch}; lower lr "
                            f"(now {c.lr}) or set grad_clip")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if c.grad_clip is not None:
                        nn.utils.clip_grad_norm_(params, c.grad_clip)
                    opt.step()
                    if c.schedule != "plateau":
                        sched.step()
                    step += 1
                    for cb in self.callbacks:
                        cb(model, step, total_steps)
                    running += float(loss.detach()) * len(self.task.targets(batch))
                    seen += len(self.task.targets(batch))
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{running / max(seen, 1):.4f}")
                val = self._validate(model)
                record = {"train/loss": running / max(seen, 1), "train/lr": opt.param_groups[0]["lr"]}
                if val is not None:
                    record["val/" + (self.task.metric_name or "metric")] = val
                self.history.append({"epoch": epoch + 1, **record})
                self._log(loggers, record, epoch + 1)
                if c.schedule == "plateau" and val is not None:
                    sched.step(val)
                if val is not None and c.early_stopping:
                    if self._better(val, best_metric):
                        best_metric, bad_epochs = val, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        bad_epochs += 1
                if ckpt is not None and tsdist.is_main():
                    ckpt.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt.with_suffix(".tmp")
                    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "best_metric": best_metric,
                                "best_state": best_state, "bad_epochs": bad_epochs,
                                "history": self.history, "rng": torch.get_rng_state()}, tmp)
                    os.replace(tmp, ckpt)
                tsdist.barrier()
                log.info("%s epoch %d/%d loss %.4f%s", self.desc, epoch + 1, c.epochs,
                         record["train/loss"], f" val {val:.4f}" if val is not None else "")
                if c.early_stopping and bad_epochs >= c.early_stopping:
                    log.info("%s: early stop after epoch %d (best val %.4f)", self.desc, epoch + 1,
                             best_metric)
                    break
        finally:
            bar.close()
            for kind, lg in loggers:
                if kind == "tensorboard":
                    lg.close()
        if best_state is not None and c.early_stopping:
            model.load_state_dict(best_state)
        return model


def train(model: nn.Module, task: Task, config: TrainConfig | None = None, **kwargs: Any) -> nn.Module:
    """Train ``model`` in place and return it (see :class:`Trainer` for keyword arguments)."""
    return Trainer(model, task, config or TrainConfig(), **kwargs).fit()
