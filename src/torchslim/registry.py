"""The method registry: ``"verb.method"`` -> (config class, handler).

A method is a frozen config class plus a handler registered under one verb::

    @register_method("prune.magnitude", MagnitudePruneConfig)
    def _magnitude(model, config, ctx): ...

Built-in methods live in ``torchslim.methods`` and are imported on first use, every module of
that package automatically, so adding a method is adding a file. Third-party packages can
register theirs through the ``torchslim.methods`` entry-point group.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .config import MethodConfig
from .errors import RecipeError, did_you_mean
from .modules import UNKNOWN_CLASS_HOOKS

log = logging.getLogger(__name__)

VERBS = ("train", "prune", "quantize", "distill", "factorize", "fold", "merge", "export")

#: verbs whose steps may leave out ``method:``
DEFAULT_METHOD = {"export": "default", "train": "sgd"}


@dataclass(frozen=True)
class MethodEntry:
    """One registered method."""

    verb: str
    name: str
    config_cls: type[MethodConfig]
    handler: Callable[..., Any]
    summary: str

    @property
    def key(self) -> str:
        return f"{self.verb}.{self.name}"


_REGISTRY: dict[str, MethodEntry] = {}
_LOADED = False


def register_method(key: str, config_cls: type[MethodConfig]) -> Callable:
    """Decorator registering ``handler(model, config, ctx) -> nn.Module`` under ``verb.name``."""
    verb, _, name = key.partition(".")
    if verb not in VERBS or not name:
        raise ValueError(f"method key must be 'VERB.NAME' with VERB in {VERBS}, got {key!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"{key}: config class must derive from MethodConfig")

    def deco(handler: Callable) -> Callable:
        if key in _REGISTRY and _REGISTRY[key].handler is not handler \
                and not getattr(_REGISTRY[key].config_cls, "MADE_FOR_CRITERION", False):
            # (a method register_criterion made for a criterion gives way to one written for it)
            raise ValueError(f"method {key!r} is already registered")
        doc = (handler.__doc__ or config_cls.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = MethodEntry(verb, name, config_cls, handler, doc[0] if doc else "")
        return handler

    return deco


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import methods

    for info in pkgutil.walk_packages(methods.__path__, prefix=methods.__name__ + "."):
        importlib.import_module(info.name)
    load_plugins()


_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import the third-party packages of the ``torchslim.methods`` entry-point group (once);
    the artifact loader calls this alone for a layer class it does not know."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in metadata.entry_points(group="torchslim.methods"):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break the built-ins
            log.warning("could not load torchslim plugin %s: %s", ep.name, exc)


def get_method(verb: str, name: str | None) -> MethodEntry:
    """Look up a method; unknown verbs and names raise with the closest matches."""
    _load_builtin()
    if verb not in VERBS:
        raise RecipeError(f"unknown step verb {verb!r}{did_you_mean(verb, VERBS)}; verbs: {', '.join(VERBS)}")
    if name is None:
        name = DEFAULT_METHOD.get(verb)
        if name is None:
            names = sorted(e.name for e in _REGISTRY.values() if e.verb == verb)
            raise RecipeError(f"{verb}: 'method' is required; accepted: {', '.join(names)}")
    key = f"{verb}.{name}"
    if key not in _REGISTRY:
        names = sorted(e.name for e in _REGISTRY.values() if e.verb == verb)
        raise RecipeError(
            f"{verb}: unknown method {name!r}{did_you_mean(name, names)}; "
            f"accepted: {', '.join(names) or '(none registered yet)'}"
        )
    return _REGISTRY[key]


def list_methods(pattern: str = "*") -> list[MethodEntry]:
    """Registered methods whose ``verb.name`` matches a glob pattern, sorted.

    Examples
    --------
    >>> [e.key for e in list_methods("prune.mag*")]
    ['prune.magnitude']
    """
    _load_builtin()
    return [e for k, e in sorted(_REGISTRY.items()) if fnmatch.fnmatch(k, pattern)]


UNKNOWN_CLASS_HOOKS.append(load_plugins)
