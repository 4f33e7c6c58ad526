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
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import RecipeError, did_you_mean

#: the model attribute holding its edit log (a list of JSON records, see torchslim.edits)
EDITS_ATTR = "_torchslim_edits"
SOURCE_ATTR = "_torchslim_source"


# -- target matching ------------------------------------------------------------------------
def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def select_modules(
    model: nn.Module,
    targets: Iterable[str] = ("re:.*",),
    ignore: Iterable[str] = (),
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    what: str = "targets",
) -> list[tuple[str, nn.Module]]:
    """Modules of the given kinds whose names match a target and no ignore pattern.

    A pattern in ``targets`` or ``ignore`` that matches no module at all is an error listing the
    nearest module names, so a typo never silently compresses nothing.
    """
    targets, ignore = tuple(targets), tuple(ignore)
    named = [(n, m) for n, m in model.named_modules() if n]
    check_patterns(model, (*targets, *ignore), what)
    chosen = [
        (n, m) for n, m in named
        if isinstance(m, kinds)
        and any(_matches(n, p) for p in targets)
        and not any(_matches(n, p) for p in ignore)
    ]
    if not chosen:
        kind_names = "/".join(k.__name__ for k in kinds)
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
        if not any(_matches(n, pat) for n in names):
            near = difflib.get_close_matches(pat.removeprefix("re:"), names, n=5, cutoff=0.3)
            hint = f"; nearest module names: {', '.join(near)}" if near else (
                f"; module names look like: {', '.join(names[:6])}")
            raise RecipeError(f"{what}: pattern {pat!r} matches no module{hint}")


# -- module surgery -------------------------------------------------------------------------
def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


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
    for key, (cls, get_args, _) in _MODULE_CLASSES.items():
        if type(module) is cls:
            return {"class": key, "args": get_args(module)}
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


def _conv_args(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


register_module_class(nn.Linear, "torch.nn.Linear",
                      lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                     bias=m.bias is not None))
register_module_class(nn.Conv2d, "torch.nn.Conv2d", _conv_args)
register_module_class(nn.BatchNorm2d, "torch.nn.BatchNorm2d",
                      lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum,
                                     affine=m.affine, track_running_stats=m.track_running_stats))
register_module_class(nn.LayerNorm, "torch.nn.LayerNorm",
                      lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                     elementwise_affine=m.elementwise_affine))
register_module_class(nn.Identity, "torch.nn.Identity", lambda m: {})
register_module_class(nn.Embedding, "torch.nn.Embedding",
                      lambda m: dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                                     padding_idx=m.padding_idx))


def iter_weights(modules: list[tuple[str, nn.Module]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module_name, weight)`` pairs for the chosen modules."""
    for name, m in modules:
        yield name, m.weight
