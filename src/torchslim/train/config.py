"""Configuration of a training run (baseline training, fine-tuning, distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import MethodConfig, ModelRef, as_mapping, option
from ..errors import RecipeError, did_you_mean

SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
#: peak learning rate of each optimizer when ``lr`` is not given: SGD (momentum 0.9) at 0.02
#: trains every built-in model on its built-in task in the default 10 epochs (zoo:digits-cnn on
#: digits 96%; at 0.05 zoo:lenet-5, which has no nonlinearity between its convolutions, diverged
#: on mnist in one of two seeds); AdamW's usual 1e-3
DEFAULT_LR = {"sgd": 0.02, "adamw": 0.001}
#: teachers named by role: the recipe's baseline model, or the model as it entered the step
TEACHER_ROLES = ("baseline", "current")
#: config fields whose values may be a role: a teacher, a merge's ingredients (``models``) and base,
#: one of several weighted teachers (``model``)
MODEL_FIELDS = ("teacher", "models", "base", "model")


def teacher_ref(value: str | ModelRef, where: str, kind: str = "teacher role") -> str | ModelRef:
    """A teacher (or a merge's ingredient, ``kind="role"``) as given: a role (``baseline``,
    ``current``), or a ModelRef for a model spec; RecipeError for a string that is neither (a
    misspelt role).

    Examples
    --------
    >>> teacher_ref("zoo:lenet-5", "teacher").spec
    'zoo:lenet-5'
    """
    if not isinstance(value, str) or value in TEACHER_ROLES:
        return value
    if ":" not in value:
        raise RecipeError(f"{where}: {value!r} is neither a {kind}{did_you_mean(value, TEACHER_ROLES)} "
                          f"nor a model spec (PREFIX:NAME); accepted: {', '.join(TEACHER_ROLES)}, or a spec such "
                          "as zoo:lenet-5 / {spec: ..., weights: ...}")
    return ModelRef(spec=value)


def build_checked(ref: ModelRef, task: Any, role: str) -> Any:
    """The model ``ref`` names, built and run once on ``task``'s example inputs (preflight); a
    SpecError names the ``role`` (``teacher``, ``student``)."""
    from ..errors import SpecError
    from ..measure import check_runs

    try:
        model = ref.build()
    except SpecError as exc:
        raise SpecError(f"{role}: {exc}") from None
    check_runs(model, task, f"{role} {ref.spec}")
    return model


def teachers_ref(value: Any, where: str) -> Any:
    """A teacher field as given: one teacher (:func:`teacher_ref`) or a non-empty tuple of
    :class:`WeightedTeacher`; RecipeError otherwise."""
    if not isinstance(value, tuple):
        return teacher_ref(value, where)
    if not value:
        raise RecipeError(f"{where}: an empty list; give one teacher or a list of {{model, weight}}")
    return value


def weighted_teachers(value: Any) -> tuple[tuple[str | ModelRef, float], ...]:
    """``((teacher, weight), ...)`` of a teacher field: the one teacher with weight 1, or the
    weighted list.

    Examples
    --------
    >>> weighted_teachers("baseline")
    (('baseline', 1.0),)
    """
    if isinstance(value, tuple):
        return tuple((t.model, t.weight) for t in value)
    return ((value, 1.0),)


def known_teachers(teachers: tuple[tuple[str | ModelRef, float], ...], roles: dict[str, Any],
                   task: Any) -> list[Any]:
    """The model of each teacher preflight knows (a role in ``roles``, a spec built and run on
    ``task``), None for the others."""
    return [roles.get(ref) if isinstance(ref, str) else build_checked(ref, task, "teacher") for ref, _ in teachers]


@dataclass(frozen=True)
class WeightedTeacher(MethodConfig):
    """One of several teachers and its weight (``teacher: [{model: baseline, weight: 0.7}, ...]``);
    a plain string stands for ``{model: STRING, weight: 1}``. Weights are normalised to sum to 1.

    Examples
    --------
    >>> WeightedTeacher.from_dict({"model": "zoo:lenet-5", "weight": 2}).model.spec
    'zoo:lenet-5'
    """

    SCALAR_FIELD: ClassVar[str | None] = "model"

    model: str | ModelRef = option("baseline", doc="baseline, current, or a model spec / {spec, weights, args}")
    weight: float = option(1.0, low=0.0, low_open=True, doc="weight of this teacher's soft targets")

    def validate(self) -> None:
        object.__setattr__(self, "model", teacher_ref(self.model, f"{type(self).__name__}.model"))


@dataclass(frozen=True)
class HintTerm(MethodConfig):
    """Feature (hint) distillation of named layers (FitNets, Romero et al. 2015): the
    :class:`~torchslim.train.distill.HintDistillation` plugin.

    Examples
    --------
    >>> HintTerm.from_dict({"layers": {"2": "2"}}).weight
    1.0
    """

    layers: dict[str, str] = option(default_factory=dict, doc="student layer name -> teacher layer name")
    weight: float = option(1.0, low=0.0, doc="weight of the hint loss (mean squared error)")
    projection: str = option("auto", choices=("auto", "always", "none"),
                             doc="a learned 1x1 conv / linear from student to teacher width: auto (when "
                                 "widths differ), always, none (widths must match); dropped after training")

    def validate(self) -> None:
        _check_layer_map(self.layers, type(self).__name__)


@dataclass(frozen=True)
class AttentionTerm(MethodConfig):
    """Attention transfer of named layers: CNN feature maps (Zagoruyko & Komodakis 2017) or the
    attention probabilities of transformer attention modules (Hugging Face BERT-style): the
    :class:`~torchslim.train.distill.AttentionTransfer` plugin.

    Examples
    --------
    >>> AttentionTerm.from_dict({"layers": {"layer1": "layer1"}, "beta": 2}).beta
    2.0
    """

    layers: dict[str, str] = option(default_factory=dict, doc="student layer name -> teacher layer name")
    beta: float = option(1.0, low=0.0, doc="weight beta of the attention loss (beta/2 for CNN maps); on this "
                                         "scale (the norm of the normalised maps) about 1 works, the paper's 1000 "
                                         "(for a per-element average) makes training diverge")
    p: float = option(2.0, low=0.0, low_open=True, doc="exponent of the CNN attention map sum_c |A_c|^p")
    loss: str = option("kl", choices=("kl", "mse"), doc="distance of attention probabilities (transformers)")

    def validate(self) -> None:
        _check_layer_map(self.layers, type(self).__name__)


def _check_layer_map(layers: dict[str, str], where: str) -> None:
    if not layers:
        raise RecipeError(f"{where}.layers: empty; give student layer -> teacher layer names, "
                          "e.g. {'2': '2'}")
    for k, v in layers.items():
        if not k or not v:
            raise RecipeError(f"{where}.layers: empty layer name in {k!r}: {v!r}")


@dataclass(frozen=True)
class DistillTerm(MethodConfig):
    """Logit distillation added to a training run (the :class:`~torchslim.train.plugins.LogitDistillation`
    plugin): ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss``.

    ``teacher``: ``baseline`` (the recipe's baseline model; with ``torchslim.apply``, the model
    given), ``current`` (the model as it entered the step), or a model spec / ``{spec, weights,
    args}``; or several weighted teachers, ``[{model: baseline, weight: 0.7}, {model: SPEC,
    weight: 0.3}]``, whose softened distributions are averaged with those weights
    (:func:`~torchslim.methods.distill.primitives.soft_targets`). ``cache: true`` keeps the
    teachers' logits of the training split on disk (un-augmented training data only). ``hint``
    and ``attention`` add feature and attention losses from the (single) teacher; ``alpha: 0``
    drops the logit term.

    Examples
    --------
    >>> DistillTerm.from_dict({"teacher": "zoo:lenet-5"}).teacher.spec
    'zoo:lenet-5'
    >>> [t.weight for t in DistillTerm.from_dict({"teacher": [{"model": "baseline", "weight": 0.7},
    ...                                                        "zoo:lenet-5"]}).teacher]
    [0.7, 1.0]
    """

    teacher: str | ModelRef | tuple[WeightedTeacher, ...] = option(
        "baseline", doc="baseline, current, or a model spec / {spec, weights, args}; or a list of "
                        "{model, weight} for several teachers")
    temperature: float = option(4.0, low=0.0, low_open=True, doc="softmax temperature T")
    alpha: float = option(0.9, low=0.0, high=1.0, doc="weight of the soft (KL) term; 1 - alpha on the task loss")
    cache: bool = option(False, doc="cache the teachers' logits of the training split on disk (the step's "
                                    "scratch directory); only for training batches without augmentation")
    hint: HintTerm | None = option(None, doc="add feature distillation: {layers: {student: teacher}, weight, "
                                             "projection}")
    attention: AttentionTerm | None = option(None, doc="add attention transfer: {layers: {student: teacher}, "
                                                       "beta, p, loss}")

    def validate(self) -> None:
        where = f"{type(self).__name__}.teacher"
        object.__setattr__(self, "teacher", teachers_ref(self.teacher, where))
        if (self.hint is not None or self.attention is not None) and len(self.teachers()) > 1:
            raise RecipeError(f"{where}: hint and attention distill from one teacher; "
                              f"{len(self.teachers())} are given")

    def teachers(self) -> tuple[tuple[str | ModelRef, float], ...]:
        """``((teacher, weight), ...)``: the one teacher with weight 1, or the weighted list."""
        return weighted_teachers(self.teacher)

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        if self.alpha > 0 and task is not None and getattr(task, "outputs", "logits") != "logits":
            raise RecipeError(f"distill: task {task.spec!r} produces {task.outputs}, not class logits; "
                              "logit distillation needs a classification task (alpha: 0 drops the logit term)")
        for ref, _ in self.teachers():
            if isinstance(ref, ModelRef):
                build_checked(ref, task, "teacher")

    def check_teachers(self, roles: dict[str, Any], model: Any, task: Any = None, shapes: bool = True) -> None:
        """Hint and attention layers, and output shapes, checked on the teachers and the model to
        be trained as far as preflight knows them (:func:`~torchslim.train.distill.check_distill`)."""
        from .distill import check_distill

        check_distill(self, known_teachers(self.teachers(), roles, task), model, task, shapes=shapes)


@dataclass(frozen=True)
class TrainConfig(MethodConfig):
    """Optimizer, schedule and regularization of a training run.

    ``lr`` left unset (None) becomes the optimizer's default, :data:`DEFAULT_LR` (SGD 0.02,
    AdamW 0.001), on construction; an explicit ``lr`` is kept as given.

    Examples
    --------
    >>> TrainConfig(epochs=3, lr=0.05, schedule="cosine").to_dict()["schedule"]
    'cosine'
    >>> TrainConfig().lr, TrainConfig(optimizer="adamw").lr
    (0.02, 0.001)
    """

    optimizer: str = option("sgd", choices=("sgd", "adamw"), doc="optimizer (the train verb's method)")
    epochs: int = option(10, low=0, high=100_000, doc="passes over the training split")
    lr: float | None = option(None, low=0.0, low_open=True,
                              doc="peak learning rate (null: the optimizer's default, sgd 0.02, adamw 0.001)")
    batch_size: int = option(64, low=1, high=65_536, doc="per-process batch size")
    schedule: str = option("cosine", choices=SCHEDULES, doc="learning-rate schedule")
    warmup: float = option(0.0, low=0.0, doc="linear warm-up length in epochs (fractions allowed; "
                                             "onecycle: the rising phase, at least 5% of the run)")
    step_size: int = option(5, low=1, doc="epochs between decays for schedule: step")
    gamma: float = option(0.1, low=0.0, high=1.0, low_open=True,
                          doc="decay factor (step; plateau: after 2 epochs without val improvement)")
    weight_decay: float = option(0.0, low=0.0, doc="L2 / decoupled weight decay")
    momentum: float = option(0.9, low=0.0, high=1.0, high_open=True,
                             doc="SGD momentum (sgd only; adamw ignores it)")
    label_smoothing: float = option(0.0, low=0.0, high=1.0, high_open=True, doc="cross-entropy label smoothing")
    dropout: float | None = option(None, low=0.0, high=1.0, high_open=True,
                                   doc="set p of every dropout layer (null: keep the model's)")
    jitter: int = option(0, low=0, high=16, doc="shift image inputs (N, C, H, W) by up to this many pixels in "
                                                 "each direction at random every step, edges replicated "
                                                 "(0: off)")
    early_stopping: int = option(0, low=0, doc="stop after this many epochs without val improvement (0: off)")
    grad_clip: float | None = option(None, low=0.0, low_open=True, doc="clip the gradient norm to this")
    seed: int = option(0, doc="seed of the shuffling and dropout (each epoch's from seed and epoch, "
                              "so resumed runs repeat exactly)")
    loggers: tuple[str, ...] = option(("tensorboard",), choices=("tensorboard", "mlflow", "wandb"),
                                      doc="where training curves go (DIR/logs for tensorboard)")
    distill: DistillTerm | None = option(None, doc="add logit distillation from a teacher: "
                                                   "{teacher: baseline|current|SPEC, temperature, alpha}")

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
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        if self.jitter and self.distill is not None and self.distill.cache:
            raise RecipeError(f"TrainConfig.distill.cache: cached teacher logits need the training images as they "
                              f"are, and jitter: {self.jitter} shifts them; set cache: false or jitter: 0")
        if self.warmup > self.epochs and self.epochs > 0:
            raise RecipeError(f"TrainConfig.warmup: {self.warmup} epochs of warm-up exceeds epochs={self.epochs}")


@dataclass(frozen=True)
class SGDTrainConfig(TrainConfig):
    """A ``train.sgd`` step: SGD with momentum (its defaults, as ``torchslim methods`` lists them)."""

    lr: float = option(DEFAULT_LR["sgd"], low=0.0, low_open=True, doc="peak learning rate")


@dataclass(frozen=True)
class AdamWTrainConfig(TrainConfig):
    """A ``train.adamw`` step: AdamW with decoupled weight decay (``momentum`` is not used)."""

    optimizer: str = option("adamw", choices=("sgd", "adamw"), doc="optimizer (the train verb's method)")
    lr: float = option(DEFAULT_LR["adamw"], low=0.0, low_open=True, doc="peak learning rate")


def teacher_roles(config: MethodConfig) -> set[str]:
    """The teacher roles (``baseline``, ``current``) that ``config`` or a config nested in it asks
    for, so the pipeline keeps what they need (a copy of the step's input model, say).

    Examples
    --------
    >>> teacher_roles(TrainConfig(distill=DistillTerm(teacher="current")))
    {'current'}
    """
    import dataclasses

    roles: set[str] = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            # a merge's ingredients and base name models as teachers do
            if f.name in MODEL_FIELDS and isinstance(item, str) and item in TEACHER_ROLES:
                roles.add(item)
            if isinstance(item, MethodConfig):   # nested configs, several weighted teachers
                roles |= teacher_roles(item)
    return roles
