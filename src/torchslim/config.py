"""Typed, frozen method configs and their dict/YAML round trip.

Every method is configured by a frozen dataclass deriving from :class:`MethodConfig`. Fields
carry their constraints as data (``field(metadata=...)`` built by :func:`option`), so
validation, ``torchslim methods`` and error messages all read the same source.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo(MethodConfig):
...     sparsity: float = option(0.5, low=0.0, high=1.0, high_open=True, doc="fraction removed")
>>> Demo(sparsity=0.9).to_dict()
{'sparsity': 0.9}
>>> Demo.from_dict({"sparsity": 0.25})
Demo(sparsity=0.25)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from .errors import Problems, RecipeError, did_you_mean

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | None = None,
    doc: str = "",
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field with its constraints stored as metadata."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices, "doc": doc}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + _describe_type(typing.get_args(tp)[0])
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return "mapping" if value_tp is Any else f"mapping of {_describe_type(key_tp)} to {_describe_type(value_tp)}"
    if isinstance(tp, type) and issubclass(tp, MethodConfig):
        return "mapping of " + tp.__name__
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _config_type(tp: Any) -> bool:
    """Whether ``tp`` is a MethodConfig class."""
    return isinstance(tp, type) and issubclass(tp, MethodConfig)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a plain YAML/JSON value into the field's declared type, or raise RecipeError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # try the more specific types first: int before float, so 3 stays 3; a float value stays a
        # float where the field takes both (``rank: 1.0`` is not ``rank: 1``)
        float_first = isinstance(value, float) and float in args
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: (a is float) != float_first):
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                # a mapping meant for a config: its own error (the field that is wrong) says more
                if isinstance(value, dict) and isinstance(arg, type) and issubclass(arg, MethodConfig):
                    raise
                # likewise a list meant for a tuple of configs (several weighted teachers)
                if isinstance(value, list) and typing.get_origin(arg) is tuple and _config_type(
                        typing.get_args(arg)[0]):
                    raise
                errors.append(str(exc))
        raise RecipeError(f"{where}: expected {_describe_type(tp)}, got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        # dict[str, float]: keys and values coerced like any field (``{"fc1": 0.9}``); YAML reads the
        # key of ``{1: 0.9}`` (a Sequential's module name) as an integer
        return {_coerce(str(k) if key_tp is str and type(k) is int else k, key_tp, f"{where} key"):
                _coerce(v, value_tp, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, MethodConfig):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp.SCALAR_FIELD:  # "zoo:lenet-5" for {spec: zoo:lenet-5}
            value = {tp.SCALAR_FIELD: value}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what float() reads, except nan/inf
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if math.isnan(value) or math.isinf(value):
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {value!r}")
    return value


def as_mapping(data: Any, where: str) -> dict[str, Any]:
    """``data`` as a dict with string keys (None -> {}), or a RecipeError saying what was found."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of fields, got {data!r}")
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(f"{where}: keys must be field names (strings), got {key!r}")
    return dict(data)


def _plain(value: Any) -> Any:
    """The YAML/JSON form of a field value."""
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: frozen, validated on construction, dict round trip.

    Subclasses declare fields with :func:`option`; a subclass that needs extra checks defines
    ``validate(self)`` and raises :class:`~torchslim.errors.RecipeError` there.
    """

    VERSION: ClassVar[int] = 1
    #: a field that a plain string value stands for (``ModelRef``: ``spec``), or None
    SCALAR_FIELD: ClassVar[str | None] = None
    #: capability: the step returns a new model (distillation's student, a merge), so later
    #: steps' target patterns cannot be checked against the model before the run
    REPLACES_MODEL: ClassVar[bool] = False
    #: capability: the step only writes files, which rank 0 alone does under torchrun
    RANK0_ONLY: ClassVar[bool] = False
    #: capability: the step changes layer shapes (structured pruning), so later steps'
    #: :meth:`check_model` cannot run on the model as built before the run
    CHANGES_SHAPES: ClassVar[bool] = False
    #: capability: the step renames or adds modules (deleting a Sequential entry renumbers the
    #: later ones; a factorized layer gains children), so later steps' targets cannot be checked
    #: against the model as built before the run
    CHANGES_NAMES: ClassVar[bool] = False
    #: capability: the step changes weight values without training them afterwards (one-shot
    #: pruning, quantization); the pipeline re-estimates BatchNorm statistics after it
    CHANGES_WEIGHTS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        problems = Problems()  # every field's problem at once; cross-field checks after
        for f in dataclasses.fields(self):
            with problems.check():
                value = getattr(self, f.name)
                tp = hints[f.name]
                where = f"{type(self).__name__}.{f.name}"
                coerced = _coerce(value, tp, where)
                if coerced is not value:
                    object.__setattr__(self, f.name, coerced)
                _check_constraints(where, coerced, f.metadata)
        problems.raise_all()
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise RecipeError with the field name and the allowed values."""

    def check_ready(self, task: Any = None) -> None:
        """Raise a UserError when the method cannot run here: a missing optional package, a
        model spec it names that does not build or does not fit ``task``. Called for every step
        before a recipe starts any work. The default checks nested configs (``finetune``);
        overrides call ``super().check_ready(task)``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MethodConfig):
                value.check_ready(task)

    def check_model(self, model: Any) -> None:
        """Raise a UserError when the step cannot run on ``model`` (the model as the step will
        receive it, weights not yet trained): e.g. a ``group_size`` that does not divide a
        targeted layer. The pipeline calls it for every step before any work, so a recipe fails
        in seconds instead of after training; the default does nothing."""

    def check_teachers(self, roles: dict[str, Any], model: Any, task: Any = None, shapes: bool = True) -> None:
        """Raise a UserError when the step's distillation cannot run with the models preflight
        knows: ``roles`` maps a teacher role to its model as built (``baseline``: the recipe's
        model; ``current``: the model entering the step, present while its shapes are known);
        ``model`` is the model the step receives (None when its module names are not known yet),
        ``shapes`` whether its layer shapes are. The pipeline calls it for every step before any
        work. The default checks nested configs (a ``finetune``'s ``distill``) with the model as
        this step leaves it: its names unless the step renames modules, its shapes unless it
        changes them."""
        after = None if self.CHANGES_NAMES else model
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MethodConfig):
                value.check_teachers(roles, after, task, shapes and after is not None and not self.CHANGES_SHAPES)

    # -- capabilities the pipeline reads (instead of verbs and attribute names) ------------
    def trains(self) -> bool:
        """Whether the step trains (reads the training split): a nested training config with
        epochs > 0 (``finetune``, ``train``) or this config itself being one."""
        epochs = getattr(self, "epochs", None)
        if isinstance(epochs, int) and epochs > 0 and "optimizer" in {f.name for f in dataclasses.fields(self)}:
            return True
        return any(isinstance(v, MethodConfig) and v.trains()
                   for v in (getattr(self, f.name) for f in dataclasses.fields(self)))

    def target_patterns(self) -> dict[str, tuple[str, ...]]:
        """Module-name patterns this config points at, by field (``targets``, ``ignore``); the
        pipeline checks each against the model before any work."""
        return {k: tuple(getattr(self, k)) for k in ("targets", "ignore")
                if isinstance(getattr(self, k, None), tuple) and getattr(self, k)}

    def check_targets(self, model: Any) -> None:
        """Raise a RecipeError when ``targets`` name a module of ``model`` (as built, before any
        step) that the method cannot handle; called with the patterns' check, before any work.
        The default checks nothing more."""

    @classmethod
    def example(cls) -> "MethodConfig":
        """A small valid config that runs in seconds on a tiny model (used by contract tests);
        configs with required fields override it."""
        return cls()

    # -- round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain YAML/JSON values."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "") -> "MethodConfig":
        """Build from a mapping; unknown keys are errors with a suggestion."""
        where = where or cls.__name__
        data = as_mapping(data, where)
        names = [f.name for f in dataclasses.fields(cls)]
        problems = Problems()  # every bad key and value of the mapping, reported together
        hints = _type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            with problems.check():
                if key not in names:
                    raise RecipeError(
                        f"{where}: unknown key {key!r}{did_you_mean(key, names)}; "
                        f"accepted keys: {', '.join(names) or '(none)'}"
                    )
                kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
        with problems.check():
            try:
                config = cls(**kwargs)
            except RecipeError as exc:
                # re-anchor messages raised in __post_init__ at the recipe location
                prefix = f"{cls.__name__}."
                raise RecipeError("\n".join(f"{where}.{line[len(prefix):]}" if line.startswith(prefix) else line
                                            for line in str(exc).splitlines())) from None
        problems.raise_all()
        return config

    @classmethod
    def describe_fields(cls) -> list[dict[str, Any]]:
        """One entry per field: name, type, default, constraint and doc (for ``methods``)."""
        hints = _type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not _MISSING:
                default = _plain(f.default)
            elif f.default_factory is not _MISSING:  # type: ignore[misc]
                default = _plain(f.default_factory())  # type: ignore[misc]
            else:
                default = None
            out.append({
                "name": f.name,
                "type": _describe_type(hints[f.name]),
                "default": default,
                "allowed": _constraint_text(f.metadata),
                "doc": f.metadata.get("doc", ""),
            })
        return out


def _constraint_text(meta: Any) -> str:
    if not meta:
        return ""
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    lo = "(" if meta.get("low_open") else "["
    hi = ")" if meta.get("high_open") else "]"
    return f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"


def _check_constraints(where: str, value: Any, meta: Any) -> None:
    if not meta or value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if item not in choices:
                raise RecipeError(
                    f"{where}: {item!r} is not accepted{did_you_mean(str(item), map(str, choices))}; "
                    f"accepted: {', '.join(map(str, choices))}"
                )
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    if isinstance(value, dict):  # a mapping's bounds hold for each of its values
        for key, item in value.items():
            _check_constraints(f"{where}[{key!r}]", item, meta)
        return
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        bad = (
            (low is not None and (item < low or (meta.get("low_open") and item == low)))
            or (high is not None and (item > high or (meta.get("high_open") and item == high)))
        )
        if bad:
            raise RecipeError(f"{where}: {item!r} is out of range; accepted: {_constraint_text(meta)}")


@dataclass(frozen=True)
class ModelRef(MethodConfig):
    """A model: spec, optional local weights and builder arguments (the recipe's ``model:``,
    teachers and students). A plain spec string is accepted wherever a ModelRef is.

    Examples
    --------
    >>> ModelRef.from_dict({"spec": "zoo:lenet-5"}).build()[0].out_channels
    20
    """

    SCALAR_FIELD: ClassVar[str | None] = "spec"

    spec: str = option("", doc="zoo:, torchvision:, hf:, py: or artifact: spec (required)")
    weights: str | None = option(None, doc="local safetensors or state_dict file")
    args: dict = option(default_factory=dict, doc="builder keyword arguments")
    output: int | str | None = option(None, doc="which output is the prediction when the model returns "
                                      "a tuple or mapping: an index (0) or a name (logits); default: "
                                      "automatic where unambiguous")

    def validate(self) -> None:
        if not self.spec:
            raise RecipeError("ModelRef.spec: missing; give a model spec such as zoo:lenet-5")
        if isinstance(self.output, str) and not self.output.strip():
            raise RecipeError("ModelRef.output: empty; give an index (0) or a name (logits)")

    @property
    def pretrained(self) -> bool:
        """True when the model arrives with trained weights (no baseline training needed)."""
        return self.weights is not None or self.spec.startswith(("hf:", "artifact:"))

    def build(self) -> Any:
        """The model (``torchslim.build_model(spec, weights=, args=, output=)``); SpecError when it fails."""
        from .specs.models import build_model
        return build_model(self.spec, weights=self.weights, args=self.args, output=self.output)
