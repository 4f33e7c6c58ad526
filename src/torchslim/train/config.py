"""Configuration of a training run (baseline training, fine-tuning, distillation)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, as_mapping, option
from ..errors import RecipeError

SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")


@dataclass(frozen=True)
class TrainConfig(MethodConfig):
    """Optimizer, schedule and regularization of a training run.

    Examples
    --------
    >>> TrainConfig(epochs=3, lr=0.05, schedule="cosine").to_dict()["schedule"]
    'cosine'
    """

    optimizer: str = option("sgd", choices=("sgd", "adamw"), doc="optimizer (the train verb's method)")
    epochs: int = option(10, low=0, doc="passes over the training split")
    lr: float = option(0.01, low=0.0, low_open=True, doc="peak learning rate")
    batch_size: int = option(64, low=1, doc="per-process batch size")
    schedule: str = option("cosine", choices=SCHEDULES, doc="learning-rate schedule")
    warmup: float = option(0.0, low=0.0, doc="linear warm-up length in epochs (fractions allowed; "
                                             "onecycle: the rising phase, at least 5% of the run)")
    step_size: int = option(5, low=1, doc="epochs between decays for schedule: step")
    gamma: float = option(0.1, low=0.0, high=1.0, low_open=True,
                          doc="decay factor (step; plateau: after 2 epochs without val improvement)")
    weight_decay: float = option(0.0, low=0.0, doc="L2 / decoupled weight decay")
    momentum: float = option(0.9, low=0.0, high=1.0, high_open=True, doc="SGD momentum")
    label_smoothing: float = option(0.0, low=0.0, high=1.0, high_open=True, doc="cross-entropy label smoothing")
    dropout: float | None = option(None, low=0.0, high=1.0, high_open=True,
                                   doc="set p of every dropout layer (null: keep the model's)")
    early_stopping: int = option(0, low=0, doc="stop after this many epochs without val improvement (0: off)")
    grad_clip: float | None = option(None, low=0.0, low_open=True, doc="clip the gradient norm to this")
    seed: int = option(0, doc="seed of the shuffling and dropout (each epoch's from seed and epoch, "
                              "so resumed runs repeat exactly)")
    loggers: tuple[str, ...] = option(("tensorboard",), choices=("tensorboard", "mlflow", "wandb"),
                                      doc="where training curves go (DIR/logs for tensorboard)")

    def check_ready(self, task=None) -> None:
        import importlib.util

        from ..errors import UserError

        super().check_ready(task)
        for name in self.loggers:
            module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name]
            if importlib.util.find_spec(module) is None:
                raise UserError(f"loggers: {name!r} is named but not installed (pip install {module})")

    @classmethod
    def example(cls) -> "TrainConfig":
        return cls(epochs=2, loggers=())

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """``method:`` is accepted as another name for ``optimizer`` (the train verb's method)."""
        data = as_mapping(data, where or cls.__name__)
        if "method" in data:
            if "optimizer" in data and data["optimizer"] != data["method"]:
                raise RecipeError(f"{where or cls.__name__}: give 'method' or 'optimizer', not both")
            data["optimizer"] = data.pop("method")
        return super().from_dict(data, where=where)

    def validate(self) -> None:
        if self.warmup > self.epochs and self.epochs > 0:
            raise RecipeError(f"TrainConfig.warmup: {self.warmup} epochs of warm-up exceeds epochs={self.epochs}")
