"""Walking a model: target matching and module swaps, written once for every method.

Modules are always named, never passed as objects: ``targets`` and ``ignore`` are lists of
exact module names or ``re:`` patterns (``re:.*fc\\d``), matched against the full name.

Structural changes go through :mod:`torchslim.edits` (``replace_module``, ``set_attribute``,
``delete_module``, ``resize_tensor``), which apply them and append a record to the model's
edit log; :func:`torchslim.load` replays that log on a freshly built architecture. A module
class can be put in place by an edit when it is registered here with
:func:`register_module_class` and offers ``rebuild_args()`` / ``from_rebuild_args(**args)``;
common ``torch.nn`` layers are registered here.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import RecipeError, did_you_mean

log = logging.getLogger(__name__)

#: the model attribute holding its edit log (a list of JSON records, see torchslim.edits)
EDITS_ATTR = "_torchslim_edits"
SOURCE_ATTR = "_torchslim_source"


# -- target matching ------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` is ``pattern`` exactly, or matches it whole when it is ``re:REGEX``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def weight_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own weight tensors: its direct parameters whose name contains
    ``weight`` and that have at least 2 dimensions (``weight`` of Linear/Conv/Embedding,
    ``weight_ih_l0``/``weight_hh_l0`` of LSTM/GRU/RNN, ``in_proj_weight`` or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` of ``nn.MultiheadAttention``).
    Biases and the 1-D scales of norm layers (BatchNorm, LayerNorm, RMSNorm) are not weights
    here; a child's tensors (``out_proj.weight``) belong to the child.

    Examples
    --------
    >>> weight_names(nn.LSTM(4, 8))
    ['weight_ih_l0', 'weight_hh_l0']
    >>> weight_names(nn.LayerNorm(4))
    []
    """
    return [n for n, p in module.named_parameters(recurse=False) if "weight" in n and p.dim() >= 2]


def select_modules(
    model: nn.Module,
    targets: Iterable[str] = ("re:.*",),
    ignore: Iterable[str] = (),
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    what: str = "targets",
    refuse: Callable[[nn.Module], str | None] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules whose names match a target and no ignore pattern, in model order.

    A module matched by a ``re:`` pattern is chosen when it is an instance of ``kinds`` (the
    classes a method picks by default); others are passed over. A module named exactly in
    ``targets`` is never passed over: it is chosen unless ``refuse(module)`` gives a reason,
    which is raised as a :class:`~torchslim.errors.RecipeError` naming the module and its class
    (without ``refuse``, a named module outside ``kinds`` is refused). A pattern in ``targets``
    or ``ignore`` that matches no module at all is an error listing the nearest module names,
    so a typo never silently compresses nothing.

    Raises
    ------
    RecipeError
        a bad or unmatched pattern, a named module that is refused, or nothing chosen.
    """
    targets, ignore = tuple(targets), tuple(ignore)
    named = [(n, m) for n, m in model.named_modules() if n]
    check_patterns(model, (*targets, *ignore), what)
    kind_names = "/".join(dict.fromkeys(k.__name__.lstrip("_").replace("ConvNd", "Conv") for k in kinds))

    def outside_kinds(m: nn.Module) -> str | None:
        return None if isinstance(m, kinds) else f"only {kind_names} modules are handled"

    refuse = refuse or outside_kinds
    chosen, passed = [], []
    for n, m in named:
        if any(matches(n, p) for p in ignore):
            continue
        if n in targets:
            reason = refuse(m)
            if reason:
                raise RecipeError(f"{what}: module {n!r} is a {type(m).__name__}: {reason}; "
                                  "remove it from targets or add it to ignore")
            chosen.append((n, m))
        elif any(matches(n, p) for p in targets if p.startswith("re:")):
            if isinstance(m, kinds):
                chosen.append((n, m))
            elif weight_names(m):
                passed.append(f"{n} ({type(m).__name__})")
    if passed:
        log.info("%s: patterns pick %s modules only; left as they are (name one to include it): %s%s",
                 what, kind_names, ", ".join(passed[:8]), f" and {len(passed) - 8} more" if len(passed) > 8 else "")
    if not chosen:
        raise RecipeError(
            f"{what}: no {kind_names} module matches targets={list(targets)} ignore={list(ignore)}"
        )
    return chosen


def check_patterns(model: nn.Module, patterns: Iterable[str], what: str) -> None:
    """Raise RecipeError for a pattern that is invalid or matches no module name."""
    names = [n for n, _ in model.named_modules() if n]
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as exc:
                raise RecipeError(f"{what}: bad regular expression {pat!r}: {exc}") from None
        if not any(matches(n, pat) for n in names):
            partial = [n for n in names if pat.startswith("re:") and re.search(pat[3:], n)]
            if partial:  # the user meant a substring search
                raise RecipeError(f"{what}: pattern {pat!r} matches no whole module name (it is found inside "
                                  f"{partial[0]!r}, but a re: pattern must match all of a name); to match names "
                                  f"containing it write 're:.*{pat[3:]}.*'")
            near = difflib.get_close_matches(pat.removeprefix("re:"), names, n=5, cutoff=0.3)
            hint = f"; nearest module names: {', '.join(near)}" if near else (
                f"; module names look like: {', '.join(names[:6])}")
            raise RecipeError(f"{what}: pattern {pat!r} matches no module{hint}")


# -- module surgery -------------------------------------------------------------------------
def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def find_module(model: nn.Module, name: str, what: str = "the model") -> nn.Module:
    """Module ``name`` of ``model`` (``""``: the model itself), or a RecipeError naming the
    closest module names of ``what`` (``"the teacher"``, say).

    Examples
    --------
    >>> find_module(nn.Sequential(nn.Linear(2, 2)), "0").out_features
    2
    """
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise RecipeError(f"no module named {name!r} in {what}{did_you_mean(name, names)}; "
                          f"module names look like: {', '.join(names[:8])}") from None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag afterwards, even
    when the block raises.

    Examples
    --------
    >>> m = nn.Dropout().train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- rebuildable module classes -------------------------------------------------------------
_MODULE_CLASSES: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[..., nn.Module]]] = {}


def register_module_class(
    cls: type | None = None,
    name: str | None = None,
    get_args: Callable[[nn.Module], dict] | None = None,
    build: Callable[..., nn.Module] | None = None,
    *,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Make ``cls`` rebuildable from an artifact manifest.

    Usable as ``register_module_class(cls, ...)``, as a bare class decorator, or as
    ``@register_module_class(aliases=(...))``. ``aliases`` are older names of the class (it
    moved), still accepted when reading artifacts; the first name is the one written.
    """
    if cls is None:
        return lambda c: register_module_class(c, name, get_args, build, aliases=aliases)
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    get_args = get_args or (lambda m: m.rebuild_args())
    build = build or getattr(cls, "from_rebuild_args", None) or cls
    _MODULE_CLASSES[key] = (cls, get_args, build)
    for alias in aliases:
        _ALIASES[alias] = key
    return cls


_ALIASES: dict[str, str] = {}
#: called, in order, before a record naming an unknown class is refused (the registry adds
#: its plugin loader here, so this module does not depend on the registry)
UNKNOWN_CLASS_HOOKS: list[Callable[[], None]] = []


def module_rebuild_record(module: nn.Module) -> dict[str, Any]:
    for attempt in range(2):
        for key, (cls, get_args, _) in _MODULE_CLASSES.items():
            if type(module) is cls:
                return {"class": key, "args": get_args(module)}
        if attempt == 0:
            _torchvision_classes()
    raise TypeError(
        f"{type(module).__name__} is not rebuildable; register it with "
        "torchslim.modules.register_module_class"
    )


def build_from_record(record: dict[str, Any]) -> nn.Module:
    key = record.get("class")
    key = _ALIASES.get(key, key)
    if key not in _MODULE_CLASSES:
        for hook in UNKNOWN_CLASS_HOOKS:  # the registry's: third-party plugins register classes on import
            hook()
    if key not in _MODULE_CLASSES:
        from .errors import ArtifactError
        raise ArtifactError(
            f"artifact names module class {key!r}, which this torchslim does not know"
            f"{did_you_mean(str(key), _MODULE_CLASSES)}"
        )
    _, _, build = _MODULE_CLASSES[key]
    return build(**record.get("args", {}))


def _conv_args(m: nn.modules.conv._ConvNd) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


def _conv_transpose_args(m: nn.modules.conv._ConvTransposeNd) -> dict:
    args = _conv_args(m)
    args["output_padding"] = list(m.output_padding)
    return args


def _batchnorm_args(m: nn.modules.batchnorm._BatchNorm) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


register_module_class(nn.Linear, "torch.nn.Linear",
                      lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                     bias=m.bias is not None))
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module_class(_cls, f"torch.nn.{_cls.__name__}", _conv_args)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_module_class(_cls, f"torch.nn.{_cls.__name__}", _conv_transpose_args)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_module_class(_cls, f"torch.nn.{_cls.__name__}", _batchnorm_args)
register_module_class(nn.GroupNorm, "torch.nn.GroupNorm",
                      lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps,
                                     affine=m.affine))
register_module_class(nn.PReLU, "torch.nn.PReLU",
                      lambda m: dict(num_parameters=m.num_parameters))
register_module_class(nn.LayerNorm, "torch.nn.LayerNorm",
                      lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                     elementwise_affine=m.elementwise_affine))
register_module_class(nn.Identity, "torch.nn.Identity", lambda m: {})
register_module_class(nn.Embedding, "torch.nn.Embedding",
                      lambda m: dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                                     padding_idx=m.padding_idx))


def _torchvision_classes() -> None:
    """Register torchvision's own resizable layers (convnext's ``LayerNorm2d``) once torchvision
    is loaded: a model holding them was built with it, and the core does not import it."""
    if "torchvision" not in sys.modules or "torchvision.models.convnext.LayerNorm2d" in _MODULE_CLASSES:
        return
    from torchvision.models.convnext import LayerNorm2d
    register_module_class(LayerNorm2d, "torchvision.models.convnext.LayerNorm2d",
                          lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                         elementwise_affine=m.elementwise_affine))


UNKNOWN_CLASS_HOOKS.append(_torchvision_classes)


def iter_weights(modules: list[tuple[str, nn.Module]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module_name, weight)`` pairs for the chosen modules."""
    for name, m in modules:
        yield name, m.weight
