"""Task specs: data, loss and metric (CONTRACT section 2).

A :class:`Task` gives the trainer its data splits and loss, the measurement its example inputs
and metric. Tasks never download anything: data comes from the data directory
(``--data-dir``, else ``$TORCHSLIM_DATA``, else ``./data``) or from a package.

A new task is one builder registered with :func:`register_task`.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..errors import DataError, SpecError, did_you_mean
from ..modules import eval_mode
from ..outputs import prediction
from ..progress import Progress


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$TORCHSLIM_DATA``, else ``./data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("TORCHSLIM_DATA")
    return Path(env).expanduser() if env else Path("data")


class Task:
    """What a model is trained and judged on.

    Subclasses set :attr:`metric_name` (``None`` for latency/size-only tasks) and implement
    :meth:`_load_splits`. Batches are tuples ``(inputs, targets)`` unless a subclass overrides
    :meth:`forward`, :meth:`loss` and :meth:`evaluate`.
    """

    metric_name: str | None = "accuracy"
    higher_is_better: bool = True
    #: what ``forward`` returns: "logits" (class scores) or "embeddings"; logit distillation
    #: needs "logits"
    outputs: str = "logits"
    #: names of the model's inputs, in the order :meth:`example_inputs` gives them, and of its
    #: output: the names an exported model (ONNX) serves under
    input_names: tuple[str, ...] = ("input",)
    output_name: str = "logits"
    #: whether the inputs are token sequences whose length varies (axis 1 after the batch)
    variable_length: bool = False

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._splits: dict[str, Dataset] | None = None

    # -- data ----------------------------------------------------------------------------
    def _load_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def split(self, name: str) -> Dataset:
        """``train``, ``val`` or ``test``."""
        if self._splits is None:
            self._splits = self._load_splits()
        return self._splits[name]

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """How raw data becomes the model's inputs, as plain JSON values (recorded in
        metrics.json, the artifact manifest and ONNX metadata, so a deployment feeds the model
        what it was trained on); ``None`` when the task does not say (a ``py:`` task may)."""
        return None

    def example_inputs(self, batch_size: int = 1) -> tuple:
        """Inputs for one forward pass with ``batch_size`` rows (latency, MACs, export)."""
        ds = self.split("test")
        n = len(ds)
        batch = self.collate([ds[i % n] for i in range(batch_size)])
        return (batch[0],)

    # -- model I/O -----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's prediction on a batch: its output, or the output its selector names when
        it returns a tuple or mapping (:func:`torchslim.outputs.prediction`)."""
        return prediction(model, model(batch[0]))

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def loss(self, outputs: torch.Tensor, batch: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(outputs, self.targets(batch), label_smoothing=label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", batch_size: int = 512) -> float | None:
        """The task metric of ``model`` on a split (accuracy by default)."""
        if self.metric_name is None:
            return None
        loader = torch.utils.data.DataLoader(self.split(split), batch_size=batch_size,
                                             collate_fn=self.collate)
        correct = total = 0
        device = _device_of(model)
        with eval_mode(model), Progress(len(loader), f"{self.metric_name} on {split}", unit="batch") as bar:
            for batch in loader:
                batch = to_device(batch, device)
                pred = self.forward(model, batch).argmax(dim=-1)
                tgt = self.targets(batch)
                correct += int((pred == tgt).sum())
                total += int(tgt.numel())
                bar.update(1)
        return correct / max(total, 1)

    def num_classes(self) -> int | None:
        """Classes of a classification task (largest training label + 1, from the dataset's
        ``tensors``/``targets``); None when unknown or not a classification task."""
        if self.metric_name != "accuracy" or self.outputs != "logits":
            return None
        try:
            ds = self.split("train")
        except Exception:  # noqa: BLE001  (a task without data: shape:, a py: task that cannot load)
            return None
        targets = ds.tensors[-1] if hasattr(ds, "tensors") else getattr(ds, "targets", None)
        if targets is None or len(targets) == 0:
            return None
        targets = torch.as_tensor(targets)
        if targets.dtype.is_floating_point or targets.dim() != 1:
            return None
        return int(targets.max()) + 1

    def chance_level(self, split: str = "test") -> float | None:
        """The metric a model reaches without learning anything: for accuracy, the share of the
        most frequent class in ``split`` (from the dataset's ``tensors``/``targets``); None when
        unknown. Used to warn when a baseline is at chance level."""
        if self.metric_name != "accuracy":
            return None
        ds = self.split(split)
        targets = ds.tensors[-1] if hasattr(ds, "tensors") else getattr(ds, "targets", None)
        if targets is None or len(targets) == 0:
            return None
        counts = torch.bincount(torch.as_tensor(targets).long().flatten())
        return float(counts.max()) / float(counts.sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# -- registry -----------------------------------------------------------------------------
_TASKS: dict[str, Callable[[str, Path], Task]] = {}


def register_task(name: str) -> Callable:
    """Register ``builder(argument, data_dir) -> Task`` for ``name`` or ``name:ARG`` specs."""
    def deco(fn: Callable[[str, Path], Task]) -> Callable:
        _TASKS[name] = fn
        return fn
    return deco


def build_task(spec: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Resolve a task spec such as ``digits``, ``mnist``, ``shape:3x224x224``."""
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"task spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in _TASKS:
        raise SpecError(f"unknown task {spec!r}{did_you_mean(name, _TASKS)}; "
                        f"accepted: {', '.join(sorted(_TASKS))}")
    task = _TASKS[name](arg, resolve_data_dir(data_dir))
    task.spec = spec
    return task


# -- digits (built in, no files) ---------------------------------------------------------
def image_preprocessing(raw: str, scale: float, mean: tuple[float, ...], std: tuple[float, ...],
                        shape: tuple[int, ...]) -> dict[str, Any]:
    """The record of an image task's preprocessing: ``x = (raw * scale - mean[c]) / std[c]``
    per channel ``c``, computed in float32, laid out (N, C, H, W)."""
    return {"input": "image", "raw": raw, "scale": scale, "mean": list(mean), "std": list(std),
            "formula": "(raw * scale - mean[c]) / std[c]", "layout": "NCHW", "dtype": "float32",
            "shape": list(shape)}


def normalize_images(raw: np.ndarray, scale: float, mean: float, std: float) -> torch.Tensor:
    """(N, H, W) raw pixel values -> (N, 1, H, W) float32 ``(raw * scale - mean) / std``."""
    t = torch.from_numpy(raw.astype(np.float32)).unsqueeze(1)       # (N, 1, H, W)
    return (t * scale - mean) / std


#: mean and std of the digits training split after scaling to [0, 1] (pixel values are 0..16)
DIGITS_MEAN, DIGITS_STD = 0.3049, 0.3758


class DigitsTask(Task):
    """scikit-learn's bundled 8x8 digits; fixed stratified split 1257 train / 180 val / 360 test.

    Inputs (N, 1, 8, 8) are the pixel values 0..16 scaled to [0, 1] and standardized with the
    training split's mean and std (:attr:`preprocessing`)."""

    @property
    def preprocessing(self) -> dict[str, Any]:
        return image_preprocessing("sklearn.datasets.load_digits pixel values 0..16", 1 / 16,
                                   (DIGITS_MEAN,), (DIGITS_STD,), (1, 8, 8))

    def _load_splits(self) -> dict[str, Dataset]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        raw, y = load_digits(return_X_y=True)
        x = normalize_images(raw.reshape(-1, 8, 8), 1 / 16, DIGITS_MEAN, DIGITS_STD)  # (N, 1, 8, 8)
        idx = np.arange(len(y))
        rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
        train, val = train_test_split(rest, test_size=180, stratify=y[rest], random_state=0)
        t = lambda ids: TensorDataset(x[ids], torch.from_numpy(y[ids]).long())  # noqa: E731
        return {"train": t(train), "val": t(val), "test": t(test)}


@register_task("digits")
def _digits(arg: str, data_dir: Path) -> Task:
    _no_arg("digits", arg)
    return DigitsTask("digits")


# -- MNIST-style IDX files ---------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 2051 images or 2049 labels, big-endian."""
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an IDX file")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2049:
        data = np.frombuffer(raw, dtype=np.uint8, offset=8)
        shape: tuple[int, ...] = (count,)
    elif magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        data = np.frombuffer(raw, dtype=np.uint8, offset=16)
        shape = (count, rows, cols)
    else:
        raise DataError(f"{path}: bad IDX magic number {magic} (expected 2049 labels or 2051 images)")
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


class IdxClassificationTask(Task):
    """MNIST / Fashion-MNIST from the four original IDX files; val = last 5000 of train."""

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, spec: str, root: Path, mean: float, std: float) -> None:
        super().__init__(spec)
        self.root, self.mean, self.std = root, mean, std

    @property
    def preprocessing(self) -> dict[str, Any]:
        return image_preprocessing("IDX uint8 pixel values 0..255", 1 / 255, (self.mean,), (self.std,),
                                   (1, 28, 28))

    def _find(self, stem: str) -> Path:
        for cand in (self.root / (stem + ".gz"), self.root / stem):
            if cand.is_file():
                return cand
        raise DataError(
            f"missing data file {self.root / (stem + '.gz')}: the {self.spec} task needs the four IDX "
            f"files ({', '.join(s + '.gz' for s in self.FILES)}) in {self.root}; "
            "set --data-dir or TORCHSLIM_DATA to the folder holding "
            f"'{self.root.name}/'. Nothing is downloaded."
        )

    def _load_splits(self) -> dict[str, Dataset]:
        arrays = [read_idx(self._find(s)) for s in self.FILES]
        xtr, ytr, xte, yte = arrays

        xtr_t, xte_t = (normalize_images(x, 1 / 255, self.mean, self.std) for x in (xtr, xte))  # (N, 1, 28, 28)
        ytr_t, yte_t = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
        return {
            "train": TensorDataset(xtr_t[:-5000], ytr_t[:-5000]),
            "val": TensorDataset(xtr_t[-5000:], ytr_t[-5000:]),
            "test": TensorDataset(xte_t, yte_t),
        }


def _no_arg(name: str, arg: str) -> None:
    if arg:
        raise SpecError(f"task {name!r} takes no argument, got '{name}:{arg}'")


@register_task("mnist")
def _mnist(arg: str, data_dir: Path) -> Task:
    _no_arg("mnist", arg)
    return IdxClassificationTask("mnist", data_dir / "mnist", 0.1307, 0.3081)


@register_task("fashion-mnist")
def _fashion(arg: str, data_dir: Path) -> Task:
    _no_arg("fashion-mnist", arg)
    return IdxClassificationTask("fashion-mnist", data_dir / "fashion-mnist", 0.2860, 0.3530)


# -- shape: random inputs, no metric -----------------------------------------------------
#: the most values one example of a shape: task may have (64 Mi: 256 MiB of float32, a
#: 3x4096x4096 image or 64 Mi tokens); a larger spec is refused before anything is allocated
MAX_EXAMPLE_ELEMENTS = 1 << 26
class ShapeTask(Task):
    """Random inputs of a fixed shape: for size and latency only (no metric, no training)."""

    metric_name = None
    output_name = "output"          # any model: its output is not known to be logits

    def __init__(self, spec: str, shape: tuple[int, ...], tokens: bool) -> None:
        super().__init__(spec)
        self.shape, self.tokens = shape, tokens
        self.input_names = ("input_ids",) if tokens else ("input",)
        self.variable_length = tokens

    def example_inputs(self, batch_size: int = 1) -> tuple:
        g = torch.Generator().manual_seed(0)
        if self.tokens:
            ids = torch.randint(1000, 2000, (batch_size, *self.shape), generator=g)
            return (ids,)
        return (torch.randn(batch_size, *self.shape, generator=g),)

    def split(self, name: str) -> Dataset:
        raise SpecError(f"task {self.spec!r} has random inputs only: it cannot train or evaluate; "
                        "use a task with data (digits, mnist, ...) for training steps")

    def evaluate(self, model: nn.Module, split: str = "test", batch_size: int = 512) -> None:
        return None


@register_task("shape")
def _shape(arg: str, data_dir: Path) -> Task:
    if not re.fullmatch(r"\d+(x\d+)*", arg or ""):
        raise SpecError(f"shape task must look like shape:CxHxW or shape:L (tokens), got 'shape:{arg}'")
    dims = tuple(int(d) for d in arg.split("x"))
    if any(d <= 0 for d in dims):
        raise SpecError(f"shape:{arg}: every dimension must be positive")
    if math.prod(dims) > MAX_EXAMPLE_ELEMENTS or len(dims) > 8:
        raise SpecError(f"shape:{arg[:60]}: {math.prod(dims):,} values per example; at most "
                        f"{MAX_EXAMPLE_ELEMENTS:,} (and 8 dimensions)")
    return ShapeTask(f"shape:{arg}", dims, tokens=len(dims) == 1)
