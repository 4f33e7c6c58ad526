"""Tasks on the user's own data or code: ``imagefolder:DIR`` and ``py:FILE.py:FACTORY``."""

from __future__ import annotations

import inspect
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError, SpecError, first_line
from .models import _load_py_factory
from .tasks import Task, image_preprocessing, register_task

# ImageNet statistics: what torchvision's pretrained weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 224


def _to_rgb(image):
    return image.convert("RGB")


class ImageFolderTask(Task):
    """Classification on ``DIR/train/CLASS/*.png`` and ``DIR/val/CLASS/*.png``; test = val.

    Images are read as RGB, resized (shorter side) and centre-cropped to S x S, where S is the
    shorter side of the first training image, at most 224; then scaled to [0, 1] and normalized
    with the ImageNet mean and std. Classes are the sub-folder names, sorted.
    """

    def __init__(self, spec: str, root: Path) -> None:
        super().__init__(spec)
        self.root = root
        self.classes: list[str] = []
        self.side: int | None = None

    @property
    def preprocessing(self) -> dict:
        """RGB, shorter side resized to S (bilinear), centre crop S x S, then
        ``(raw * scale - mean[c]) / std[c]``; S is known once the data is read."""
        if self.side is None:
            self.split("train")
        rec = image_preprocessing("RGB image file, 8-bit channels 0..255", 1 / 255, IMAGENET_MEAN,
                                  IMAGENET_STD, (3, self.side, self.side))
        return {**rec, "color": "RGB", "resize_shorter_side": self.side, "interpolation": "bilinear",
                "center_crop": [self.side, self.side]}

    def _load_splits(self) -> dict[str, Dataset]:
        from PIL import Image
        from torchvision import datasets, transforms

        folders = {}
        for name in ("train", "val"):
            d = self.root / name
            if not d.is_dir():
                raise DataError(f"missing folder {d}: the task {self.spec!r} needs {self.root}/train/CLASS/ "
                                f"and {self.root}/val/CLASS/ folders of images (torchvision ImageFolder)")
            try:
                folders[name] = datasets.ImageFolder(str(d))
            except (FileNotFoundError, OSError) as exc:
                raise DataError(f"{d}: not a usable image folder ({exc}); expected one sub-folder per "
                                "class holding .png/.jpg images") from None
        train_classes, val_classes = folders["train"].classes, folders["val"].classes
        if train_classes != val_classes:
            raise DataError(f"{self.root}: train/ classes {train_classes} differ from val/ classes "
                            f"{val_classes}; both need the same class sub-folders")
        self.classes = train_classes
        first = folders["train"].samples[0][0]
        try:
            with Image.open(first) as im:
                side = min(min(im.size), MAX_SIDE)
                self.side = side
        except OSError as exc:
            raise DataError(f"{first}: cannot read image: {exc}") from None
        tf = transforms.Compose([
            transforms.Lambda(_to_rgb),
            transforms.Resize(side), transforms.CenterCrop(side),
            transforms.ToTensor(),                                      # (3, S, S) in [0, 1]
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        for f in folders.values():
            f.transform = tf
        return {"train": folders["train"], "val": folders["val"], "test": folders["val"]}


@register_task("imagefolder")
def _imagefolder(arg: str, data_dir: Path) -> Task:
    if not arg:
        raise SpecError("imagefolder task needs a folder: imagefolder:DIR (DIR/train/ and DIR/val/)")
    path = Path(arg).expanduser()
    if not path.is_dir() and not path.is_absolute() and (data_dir / path).is_dir():
        path = data_dir / path          # relative names are also looked up in the data directory
    if not path.is_dir():
        raise DataError(f"imagefolder:{arg}: folder not found: {path} (also looked in {data_dir / arg}); "
                        "expected DIR/train/CLASS/ and DIR/val/CLASS/ folders of images")
    return ImageFolderTask(f"imagefolder:{arg}", path)


@register_task("py")
def _py_task(ref: str, data_dir: Path) -> Task:
    """``py:FILE.py:FACTORY``: ``FACTORY()`` (or ``FACTORY(data_dir=...)``) returns a Task."""
    fn = _load_py_factory(ref)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None                      # builtins without a signature: call with no arguments
    kwargs = {}
    if sig is not None:
        params = sig.parameters.values()
        if "data_dir" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in params):
            kwargs["data_dir"] = data_dir
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            raise SpecError(f"py:{ref}: the factory cannot be called as {fn.__name__}("
                            f"{'data_dir=...' if kwargs else ''}): {exc}; a task factory takes no "
                            "required arguments, or a keyword argument data_dir") from None
    try:
        task = fn(**kwargs)
    except (SpecError, DataError):
        raise
    except Exception as exc:  # the user's own factory failed: its message, and --debug shows where
        raise SpecError(f"py:{ref}: the task factory raised {type(exc).__name__}: "
                        f"{first_line(exc, 300)}") from exc
    if not isinstance(task, Task):
        raise SpecError(f"py:{ref} returned {type(task).__name__}, not a task: the factory must return "
                        "an instance of a torchslim.specs.Task subclass")
    return task
