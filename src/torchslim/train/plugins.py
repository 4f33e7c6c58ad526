"""Training plugins: how methods extend the one trainer instead of writing loops of their own.

A plugin may add loss terms, add trainable parameters (a hint projection trained with the
student), act after each optimizer step (pruning masks, gradual schedules), and keep state that
is saved with every epoch checkpoint, so a resumed run continues exactly. Pruning masks,
gradual schedules and the distillation teacher are plugins, so "prune while distilling" is a
recipe (``finetune: {distill: {teacher: baseline}}``), not new code.

The trainer calls, in order: :meth:`TrainingPlugin.setup` once; then per batch
``loss = plugin.loss(model, batch, outputs, loss)`` for each plugin in list order, backward,
the optimizer step, and :meth:`TrainingPlugin.after_step`; :meth:`TrainingPlugin.teardown`
once at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainingPlugin:
    """Base class of training plugins; every hook is optional.

    Thread/process model: one instance per process; under torchrun each rank has its own and the
    trainer averages the gradients of :meth:`parameters` over ranks like DDP does for the model's.
    """

    def setup(self, trainer: Any) -> None:
        """Called once before the first batch (``trainer.model``, ``trainer.task`` are set)."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters, optimized with the model's (default none). Their values
        belong in :meth:`state_dict` too, so a resumed run continues with them (the optimizer's
        state for them is checkpointed by the trainer)."""
        return []

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        """The new training loss given the loss so far (default: unchanged).

        ``outputs`` is the model's output on ``batch`` (``task.forward``), or None when the
        trainer was given a custom ``loss_fn``; ``model`` may be the DDP wrapper.
        """
        return loss

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step with the bare model and the 1-based step count."""

    def teardown(self) -> None:
        """Called once after the last epoch (also when training stops early or fails inside the
        loop): remove hooks, restore what :meth:`setup` changed on the model."""

    def state_dict(self) -> dict[str, Any] | None:
        """State to checkpoint with each epoch (tensors and plain containers only), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class CallbackPlugin(TrainingPlugin):
    """A plain ``fn(model, step, total_steps)`` called after each step, as a plugin."""

    def __init__(self, fn: Callable[[nn.Module, int, int], None]) -> None:
        self.fn = fn

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.fn(model, step, total_steps)

    def state_dict(self) -> dict[str, Any] | None:
        return self.fn.state_dict() if hasattr(self.fn, "state_dict") else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state)


class LogitDistillation(TrainingPlugin):
    """Knowledge distillation on logits as a loss term (Hinton et al. 2015, eq. 2).

    The new loss is ``alpha * T^2 * KL(p_T^teacher || p_T^student) + (1 - alpha) * loss`` where
    ``loss`` is the task loss so far (cross-entropy with the configured label smoothing). The
    teachers run in eval mode under ``no_grad`` and are never changed. With several teachers,
    ``p_T^teacher`` is the weighted average of their softened distributions
    (:func:`~torchslim.methods.distill.primitives.soft_targets`).

    Parameters
    ----------
    teacher : nn.Module or list of nn.Module
        Frozen; moved to the student's device at setup.
    temperature : float
        ``T > 0``; softens both distributions.
    alpha : float
        Weight of the soft term in [0, 1].
    weights : list of float, optional
        One weight per teacher (default equal); normalised to sum to 1.
    cache : bool, default=False
        Compute each teacher's logits on the whole training split once at setup and look them
        up per batch instead of running the teachers. Batches are matched to cached examples by
        a digest of their tensors (the trainer's batches carry no example index), so this holds
        only for training data without augmentation: a batch row not in the cache is an error.
    cache_dir : path, optional
        Where the cache is kept (``teacher-logits-K.safetensors``, one per teacher, row ``i``
        for training example ``i``) and reused by a resumed run when the teacher and task match;
        None keeps it in memory.

    Raises
    ------
    RecipeError
        When the student's and teacher's outputs differ in shape (named in the message), or a
        cached run meets an example that is not in the cache.
    """

    def __init__(self, teacher: nn.Module | list[nn.Module], temperature: float = 4.0, alpha: float = 0.9,
                 *, weights: list[float] | None = None, cache: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> None:
        from ..errors import RecipeError

        self.teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        self.teacher = self.teachers[0]
        if temperature <= 0:
            raise RecipeError(f"distill: temperature must be > 0, got {temperature}")
        self.weights = [1.0] * len(self.teachers) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.teachers) or any(w <= 0 for w in self.weights):
            raise RecipeError(f"distill: need one positive weight per teacher ({len(self.teachers)}), "
                              f"got {self.weights}")
        self.temperature, self.alpha = temperature, alpha
        self.cache, self.cache_dir = cache, (Path(cache_dir) if cache_dir is not None else None)
        self.task: Any = None
        self._cached: list[torch.Tensor] = []   # per teacher (N_train, C), on the CPU
        self._rows: dict[bytes, int] = {}        # example digest -> row of the cache

    def setup(self, trainer: Any) -> None:
        from ..specs.tasks import _device_of

        self.task = trainer.task
        device = _device_of(trainer.model)
        for t in self.teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
            t.to(device)
        if self.cache:
            self._fill_cache(device)

    def _fill_cache(self, device: torch.device) -> None:
        """Teacher logits of every training example, in dataset order, read from or written to
        ``cache_dir`` (a file is reused only when its teacher and task fingerprint match)."""
        from .. import distributed as tsdist
        from ..fileio import atomic_path
        from ..specs.tasks import to_device

        ds = self.task.split("train")
        self._cached, digests = [], None
        for k, teacher in enumerate(self.teachers):
            fingerprint = _fingerprint(teacher, f"{self.task.spec}|{len(ds)}")
            path = self.cache_dir / f"teacher-logits-{k}.safetensors" if self.cache_dir else None
            if path is not None and path.is_file():
                from safetensors import safe_open
                with safe_open(str(path), "pt") as f:
                    if (f.metadata() or {}).get("fingerprint") == fingerprint:
                        self._cached.append(f.get_tensor("logits"))
                        digests = f.get_tensor("digests")
                        continue
            chunks, rows = [], []
            with torch.no_grad():
                for i in range(0, len(ds), 256):
                    batch = self.task.collate([ds[j] for j in range(i, min(i + 256, len(ds)))])
                    rows.append(_row_digests(batch))
                    chunks.append(self.task.forward(teacher, to_device(batch, device)).detach().float().cpu())
            self._cached.append(torch.cat(chunks))                       # (N_train, C)
            digests = torch.cat(rows)                                     # (N_train, 16)
            if path is not None and tsdist.is_main():
                from safetensors.torch import save_file
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({"logits": self._cached[-1], "digests": digests}, str(tmp),
                              metadata={"fingerprint": fingerprint, "task": self.task.spec})
        self._rows = {bytes(d.tolist()): i for i, d in enumerate(digests)}

    def _teacher_logits(self, batch: Any) -> list[torch.Tensor]:
        from ..errors import RecipeError

        if not self.cache:
            with torch.no_grad():
                return [self.task.forward(t, batch) for t in self.teachers]
        try:
            idx = [self._rows[bytes(d.tolist())] for d in _row_digests(batch)]
        except KeyError:
            raise RecipeError("distill cache: a training batch holds an example that is not in the cached "
                              "training split (augmented or generated batches?); set cache: false") from None
        device = self.task.targets(batch).device
        return [c[idx].to(device) for c in self._cached]

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        from ..errors import RecipeError

        if outputs is None:
            outputs = self.task.forward(model, batch)
        t_outs = self._teacher_logits(batch)
        for k, t_out in enumerate(t_outs):
            if outputs.shape != t_out.shape:
                which = "the teacher" if len(t_outs) == 1 else f"teacher {k + 1} of {len(t_outs)}"
                raise RecipeError(f"distill: the student outputs {tuple(outputs.shape)} but {which} outputs "
                                  f"{tuple(t_out.shape)}; they must match")
        soft = self.term(outputs, t_outs)
        return soft if self.alpha >= 1.0 else self.alpha * soft + (1.0 - self.alpha) * loss

    def term(self, outputs: torch.Tensor, teacher_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The distillation term of the student's outputs and each teacher's (same shapes) on one
        batch; a subclass may compare them otherwise (embedding distillation)."""
        from ..methods.distill.primitives import kd_loss, soft_target_loss, soft_targets  # pure tensor math

        if len(teacher_outputs) == 1:
            return kd_loss(outputs, teacher_outputs[0], None, self.temperature, 1.0)
        return soft_target_loss(outputs, soft_targets(teacher_outputs, self.temperature, self.weights),
                                self.temperature)


def _row_digests(batch: Any) -> torch.Tensor:
    """A 16-byte digest per example of ``batch`` over the bytes of all its tensors (inputs and
    targets), as ``(N, 16)`` uint8: equal for the same example however it is batched, as long as
    its tensors are (fixed-shape inputs; padding to the batch's longest sequence changes them)."""
    import hashlib

    leaves: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            leaves.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for key in sorted(x):
                walk(x[key])

    walk(batch)
    n = leaves[0].shape[0] if leaves and leaves[0].dim() else 0
    rows = [t.detach().cpu().contiguous().reshape(n, -1).view(torch.uint8).numpy() for t in leaves
            if t.dim() and t.shape[0] == n]
    out = torch.empty(n, 16, dtype=torch.uint8)
    for r in range(n):
        h = hashlib.blake2b(digest_size=16)
        for b in rows:
            h.update(b[r].tobytes())
        out[r] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out


def _fingerprint(model: nn.Module, extra: str) -> str:
    """A digest of ``model``'s state (names, shapes, dtypes, values) and ``extra``."""
    import hashlib

    h = hashlib.blake2b(extra.encode(), digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
