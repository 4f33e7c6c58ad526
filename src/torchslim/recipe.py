"""Recipes: the single source of what a run does (CONTRACT section 4).

A recipe is a model, a task, an optional baseline ``train`` block and an ordered list of steps,
each ``VERB: {method: NAME, ...fields}``. YAML, the CLI and Python all go through
:meth:`Recipe.from_dict`, which validates the whole recipe (every step's config) before any
work starts; errors name the YAML line and key and suggest close names.

Examples
--------
>>> r = Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits",
...                       "steps": [{"prune": {"method": "magnitude", "sparsity": 0.8}}]})
>>> r.steps[0].config.sparsity
0.8
>>> Recipe.from_dict(r.to_dict()) == r
True
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MethodConfig, ModelRef, as_mapping, option
from .errors import Problems, RecipeError, UserError, did_you_mean
from .registry import DEFAULT_METHOD, VERBS, get_method
from .train.config import TrainConfig

TOP_KEYS = ("version", "model", "task", "train", "steps", "measure", "search", "device", "recalibrate_bn")
#: the recipe format this torchslim writes (``version:`` of a resolved recipe) and reads at most
RECIPE_VERSION = 1
#: the largest batch size a recipe or command line may ask for (inputs are allocated whole)
MAX_BATCH = 65536
#: the most bytes one batch of measured inputs may take (checked before anything is allocated)
MAX_INPUT_BYTES = 4 << 30
#: a recipe file larger than this is refused unread (a recipe is a few KiB)
MAX_RECIPE_BYTES = 1 << 20
#: YAML nodes a recipe may expand to through aliases (``*a``): a "billion laughs" file is
#: refused before it is built
MAX_YAML_NODES = 100_000
#: search space kinds (CONTRACT section 4) and how many values each takes
SEARCH_SPACES = ("uniform", "log_uniform", "int", "choice")


@dataclass(frozen=True)
class MeasureConfig(MethodConfig):
    """How every step is measured.

    Examples
    --------
    >>> MeasureConfig(split="val").runtime
    'eager'
    >>> MeasureConfig(runtime="eagr")
    Traceback (most recent call last):
    ...
    torchslim.errors.RecipeError: MeasureConfig.runtime: unknown runtime 'eagr' (did you mean 'eager'?); runtimes: compile, eager, onnxruntime, sparse
    """

    batch_sizes: tuple[int, ...] = option((1, 32), low=1, high=MAX_BATCH, doc="latency batch sizes")
    split: str = option("test", choices=("test", "val"),
                        doc="split the metric is computed on: test for reports, val for searches")
    runtime: str = option("eager", doc="runtime whose forward pass latency is timed (torchslim.runtime "
                                       "registry: eager, compile, onnxruntime, ...)")
    latency: bool = option(True, doc="time the forward pass (latency_ms); false skips it")
    warn_drop: float = option(0.05, low=0.0, doc="warn (console and report banner) when a step lowers the "
                                                 "metric by more than this, in the metric's units "
                                                 "(0.05: 5 points of accuracy)")

    def validate(self) -> None:
        from .runtime import runtime_class

        if not self.batch_sizes:
            raise RecipeError("MeasureConfig.batch_sizes: give at least one batch size, e.g. [1, 32]")

        try:
            runtime_class(self.runtime)
        except RecipeError as exc:
            raise RecipeError(f"MeasureConfig.runtime: {exc}") from None

    def check_ready(self, task=None) -> None:
        """Raise a UserError when the runtime cannot run here (``pip install 'torchslim[onnx]'``),
        or when the largest batch of the task's inputs would exceed MAX_INPUT_BYTES."""
        super().check_ready(task)
        from .runtime import runtime_class

        runtime_class(self.runtime).check_available()
        if task is not None and self.latency:
            try:
                example = task.example_inputs(1)
            except UserError:
                return  # a task without data: reported where its data are needed
            per_example = sum(t.numel() * t.element_size() for t in example if hasattr(t, "numel"))
            largest = max(self.batch_sizes)
            if per_example * largest > MAX_INPUT_BYTES:
                raise RecipeError(f"batch_sizes: a batch of {largest} inputs of task {task.spec!r} "
                                  f"takes {per_example * largest / 2**30:,.1f} GiB (limit "
                                  f"{MAX_INPUT_BYTES / 2**30:.0f} GiB); use smaller batch sizes")


@dataclass(frozen=True)
class Step:
    verb: str
    method: str
    config: MethodConfig

    @property
    def key(self) -> str:
        return f"{self.verb}.{self.method}"

    def to_dict(self) -> dict[str, Any]:
        body = self.config.to_dict()
        if self.verb == "train":
            body.pop("optimizer", None)
        return {self.verb: {"method": self.method, "version": self.config.VERSION, **body}}


@dataclass(frozen=True)
class Recipe:
    model: ModelRef
    task: str
    train: TrainConfig | None = None
    steps: tuple[Step, ...] = ()
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    search: dict = field(default_factory=dict)
    device: str = "auto"
    #: training examples that re-estimate BatchNorm statistics after a step that changes weights
    #: without training them (0: off)
    recalibrate_bn: int = 512

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, lines: dict[str, int] | None = None, source: str = "recipe") -> "Recipe":
        """Build and validate a recipe; every problem found is reported at once (one line each,
        ``file:line: dotted.key: what is wrong``) as a RecipeError."""
        try:
            recipe = cls._from_dict(data)
        except RecipeError as exc:
            raise RecipeError("\n".join(_locate(line, lines or {}, source)
                                        for line in str(exc).splitlines())) from None
        # where each key came from, for errors found later (target patterns vs the real model)
        object.__setattr__(recipe, "_origin", (dict(lines or {}), source))
        return recipe

    def locate(self, message: str) -> str:
        """Prefix each line of ``message`` (``dotted.path: ...``) with the recipe file and line it
        refers to."""
        lines, source = getattr(self, "_origin", ({}, "recipe"))
        return "\n".join(_locate(line, lines, source) for line in message.splitlines())

    @classmethod
    def _from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError("recipe: the top level must be a mapping with keys "
                              + ", ".join(TOP_KEYS))
        problems = Problems()
        for key in data:
            if key not in TOP_KEYS:
                with problems.check():
                    raise RecipeError(f"{key}: unknown recipe key{did_you_mean(key, TOP_KEYS)}; "
                                      f"accepted: {', '.join(TOP_KEYS)}")
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecipeError(f"version: expected a positive integer, got {version!r}")
        if version > RECIPE_VERSION:
            raise RecipeError(f"version: this recipe is of format version {version}, newer than this "
                              f"torchslim reads (<= {RECIPE_VERSION}); upgrade torchslim")
        model = task = train_cfg = measure = None
        steps: list[Step] = []
        with problems.check():
            if "model" not in data:
                raise RecipeError("model: missing; give a spec such as zoo:lenet-5")
            model = data["model"]
            model = ModelRef.from_dict({"spec": model} if isinstance(model, str) else model, where="model")
        with problems.check():
            if "task" not in data:
                raise RecipeError("task: missing; give a task such as digits or mnist")
            task = data["task"]
            if not isinstance(task, str) or not task:
                raise RecipeError(f"task: expected a task spec string, got {task!r}")
        with problems.check():
            train = data.get("train")
            train_cfg = None if train is None else TrainConfig.from_dict(train, where="train")
        raw_steps = data.get("steps") or []
        if not isinstance(raw_steps, list):
            with problems.check():
                raise RecipeError("steps: expected a list of steps (each 'VERB: {method: NAME, ...}')")
            raw_steps = []
        for i, s in enumerate(raw_steps):
            with problems.check():
                steps.append(parse_step(s, f"steps.{i}"))
        with problems.check():
            measure = MeasureConfig.from_dict(data.get("measure") or {}, where="measure")
        search = data.get("search") or {}
        with problems.check():
            if not isinstance(search, dict):
                raise RecipeError("search: expected a mapping of dotted paths to search spaces")
        device = data.get("device", "auto")
        with problems.check():
            if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
                raise RecipeError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
        recalibrate_bn = data.get("recalibrate_bn", 512)
        with problems.check():
            if recalibrate_bn is False:
                recalibrate_bn = 0
            if not isinstance(recalibrate_bn, int) or isinstance(recalibrate_bn, bool) or not 0 <= recalibrate_bn <= 10**7:
                raise RecipeError(f"recalibrate_bn: expected a number of training examples (0 or false: off; "
                                  f"default 512), got {recalibrate_bn!r}")
        problems.raise_all()
        recipe = cls(model, task, train_cfg, tuple(steps), measure, dict(search), device, recalibrate_bn)
        validate_search(recipe.search, recipe.to_dict())
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        data, lines = load_yaml(path)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, lines, source=str(path))

    # -- output --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default written out."""
        out: dict[str, Any] = {"version": RECIPE_VERSION, "model": self.model.to_dict(), "task": self.task}
        if self.train is not None:
            out["train"] = self.train.to_dict()
        out["steps"] = [s.to_dict() for s in self.steps]
        out["measure"] = self.measure.to_dict()
        if self.search:
            out["search"] = copy.deepcopy(self.search)
        if self.device != "auto":
            out["device"] = self.device
        out["recalibrate_bn"] = self.recalibrate_bn
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_search(search: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Check a ``search:`` block: each key a dotted path to a field of the resolved recipe, each
    value one search space (``{uniform: [lo, hi]}``, ``{log_uniform: [lo, hi]}`` with lo > 0,
    ``{int: [lo, hi]}``, ``{choice: [a, ...]}``); RecipeError naming the key otherwise."""
    for key, space in search.items():
        where = f"search.{key}"
        if not isinstance(key, str) or not key:
            raise RecipeError(f"search: keys are dotted field paths such as train.lr, got {key!r}")
        node: Any = resolved
        parts = key.split(".")
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                options = list(node) if isinstance(node, dict) else (
                    [str(j) for j in range(len(node))] if isinstance(node, list) else [])
                raise RecipeError(f"{where}: {here} is not a field of the recipe{did_you_mean(part, options)}"
                                  + (f"; fields there: {', '.join(map(str, options[:12]))}" if options else ""))
        if isinstance(node, (dict, list)):
            raise RecipeError(f"{where}: names a whole section, not one field")
        if not isinstance(space, dict) or len(space) != 1:
            raise RecipeError(f"{where}: expected one search space, e.g. {{uniform: [0.1, 0.9]}}; "
                              f"kinds: {', '.join(SEARCH_SPACES)}")
        ((kind, values),) = space.items()
        if kind not in SEARCH_SPACES:
            raise RecipeError(f"{where}: unknown search space {kind!r}{did_you_mean(str(kind), SEARCH_SPACES)}; "
                              f"kinds: {', '.join(SEARCH_SPACES)}")
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise RecipeError(f"{where}.choice: expected a non-empty list of values")
            continue
        if not (isinstance(values, list) and len(values) == 2 and all(map(_number, values))):
            raise RecipeError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise RecipeError(f"{where}.{kind}: low {lo} must be below high {hi}")
        if kind == "log_uniform" and lo <= 0:
            raise RecipeError(f"{where}.log_uniform: low must be > 0, got {lo}")
        if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise RecipeError(f"{where}.int: bounds must be integers, got {values!r}")
        if kind != "int" and isinstance(node, int) and not isinstance(node, bool):
            raise RecipeError(f"{where}.{kind}: {key} is an integer field; use {{int: [{lo}, {hi}]}}")
    # every value a search can try must be one the field accepts: the recipe with each bound or
    # choice put in place is validated like any recipe
    for key, space in search.items():
        ((kind, values),) = space.items()
        for value in (values if kind == "choice" else [int(v) for v in values] if kind == "int" else values):
            trial = copy.deepcopy({k: v for k, v in resolved.items() if k != "search"})
            set_path(trial, key, value, "search")
            try:
                Recipe._from_dict(trial)
            except RecipeError as exc:
                raise RecipeError(f"search.{key}: the value {value!r} of {{{kind}: {values}}} is not accepted: "
                                  f"{exc}") from None


def parse_step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RecipeError(f"{where}: a step is a mapping with one verb, e.g. "
                          "'prune: {method: magnitude, sparsity: 0.9}'; verbs: " + ", ".join(VERBS))
    ((verb, body),) = raw.items()
    if verb not in VERBS:
        raise RecipeError(f"{where}: unknown step verb {verb!r}{did_you_mean(str(verb), VERBS)}; "
                          f"verbs: {', '.join(VERBS)}")
    body = as_mapping(body, f"{where}.{verb}")
    if "method" not in body:
        for key in body:
            if did_you_mean(str(key), ["method"]):
                raise RecipeError(f"{where}.{verb}: unknown key {key!r} (did you mean 'method'?)")
    method = body.pop("method", DEFAULT_METHOD.get(verb))
    try:
        entry = get_method(verb, method)
    except RecipeError as exc:
        raise RecipeError(f"{where}.{verb}.method: {exc}") from None
    version = body.pop("version", entry.config_cls.VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecipeError(f"{where}.{verb}.version: expected a positive integer, got {version!r}")
    if version > entry.config_cls.VERSION:
        raise RecipeError(f"{where}.{verb}.version: written for version {version} of {entry.key}; this "
                          f"torchslim has version {entry.config_cls.VERSION}; upgrade torchslim")
    if verb == "train":
        body["optimizer"] = entry.name  # the train verb's methods are optimizers
    config = entry.config_cls.from_dict(body, where=f"{where}.{verb}")
    return Step(verb, entry.name, config)


# -- YAML with line numbers ----------------------------------------------------------------
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader reading ``2:4`` as the string it looks like (YAML 1.2), not the base-60 number
    124 of YAML 1.1: N:M granularities and times need no quotes."""

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0] and _SEXAGESIMAL.fullmatch(value):
            return "tag:yaml.org,2002:str"
        return super().resolve(kind, value, implicit)


class _StrictLoader(RecipeLoader):
    """RecipeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

def load_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML safely; returns (data, {dotted.path: line}) for error messages."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        try:
            expanded = _expanded_size(node)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        if expanded > MAX_YAML_NODES:
            raise RecipeError(f"{path}: the YAML expands to {expanded:,} values through its aliases (*name); "
                              f"a recipe may have at most {MAX_YAML_NODES:,}")
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply or refers to itself (a recursive anchor)") from None
    lines: dict[str, int] = {}

    seen: set[int] = set()

    def walk(n: Any, prefix: str) -> None:
        if id(n) in seen:  # an alias (*a) points back at a node already walked
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                p = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                p = f"{prefix}.{i}" if prefix else str(i)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if node is not None:
        walk(node, "")
    return data, lines


def _expanded_size(node: Any, limit: int = MAX_YAML_NODES) -> int:
    """How many nodes the YAML graph ``node`` stands for once every alias is expanded (counted
    with memoization, so computing it is cheap even when the expansion is not); stops counting
    past ``limit``. RecipeError for a node that contains itself."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(n: Any) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in active:
            raise RecipeError("the YAML refers to itself: an alias (*name) inside the value of its own anchor (&name)")
        active.add(key)
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        active.discard(key)
        memo[key] = total = min(total, limit + 1)
        return total

    return 0 if node is None else size(node)


def _locate(msg: str, lines: dict[str, int], source: str) -> str:
    """Prefix an error ``dotted.path: ...`` with ``file:line:`` of the deepest known key."""
    head = msg.split(":", 1)[0].strip()
    path = re.sub(r"\[(\d+)\]", r".\1", head)
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        p = ".".join(parts[:n])
        if p in lines:
            return f"{source}:{lines[p]}: {msg}"
    return f"{source}: {msg}" if source != "recipe" else msg


def apply_override(data: Any, item: str) -> None:
    """Apply ``--set dotted.path=VALUE`` (VALUE parsed as YAML) to a raw recipe mapping."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps.0.prune.sparsity=0.8")
    if len(item) > 10_000:
        raise RecipeError(f"--set {item[:60]!r}...: {len(item):,} characters; at most 10,000")
    try:
        node = yaml.compose(raw, Loader=RecipeLoader) if raw != "" else None
        if _expanded_size(node, 10_000) > 10_000:
            raise RecipeError(f"--set {key}: the value expands to too many YAML values through aliases")
        value = yaml.load(raw, Loader=RecipeLoader) if raw != "" else None  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"--set {key}: the value is nested too deeply") from None
    set_path(data, key, value, what="--set")


def set_path(data: Any, key: str, value: Any, what: str = "path") -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"{what} {key}: {here} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                if isinstance(node[part], str) and here == "model":
                    node[part] = {"spec": node[part]}
                node = node[part]
        else:
            raise RecipeError(f"{what} {key}: {'.'.join(parts[:i]) or 'recipe'} is not a mapping or list")
