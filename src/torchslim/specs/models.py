"""Model specs: ``zoo:``, ``torchvision:``, ``hf:``, ``py:`` (and ``artifact:``, registered by :mod:`torchslim.artifact`).

Every model built here carries a *source record* (a small JSON-able dict) on the module. The
artifact writer stores it so that :func:`torchslim.load` can rebuild the architecture without
the user's recipe; weights then come from the artifact's tensors.

A new model source is one function registered with :func:`register_model_source`.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SpecError, did_you_mean
from ..modules import EDITS_ATTR, SOURCE_ATTR
from ..outputs import set_output
from .zoo import ZOO

log = logging.getLogger(__name__)

# prefix -> fn(rest_of_spec, args) -> (module, source_record)
_SOURCES: dict[str, Callable[[str, dict], tuple[nn.Module, dict]]] = {}


def register_model_source(prefix: str) -> Callable:
    def deco(fn: Callable[[str, dict], tuple[nn.Module, dict]]) -> Callable:
        _SOURCES[prefix] = fn
        return fn
    return deco


def build_model(spec: str, *, weights: str | os.PathLike | None = None,
                args: dict[str, Any] | None = None, output: int | str | None = None) -> nn.Module:
    """Build a model from a spec string, optionally loading weights from a local file.

    Parameters
    ----------
    spec : str
        ``zoo:NAME``, ``torchvision:NAME``, ``hf:PATH``, ``py:FILE.py:FACTORY`` or ``artifact:DIR``.
    weights : path, optional
        A safetensors file or a ``torch.save`` state_dict (read with ``weights_only=True``).
    args : dict, optional
        Keyword arguments for the builder (``num_classes``, ``channels``, ...).
    output : int or str, optional
        Which output is the prediction when the model returns a tuple or mapping (an index or
        a name, see :mod:`torchslim.outputs`); kept in the source record. An ``artifact:``
        model keeps the one it was saved with unless this is given.

    Examples
    --------
    >>> m = build_model("zoo:lenet-5")
    >>> sum(p.numel() for p in m.parameters())
    431080
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(
            f"model spec {spec!r} is not of the form PREFIX:NAME; prefixes: {', '.join(sorted(_SOURCES))}")
    prefix, _, rest = spec.partition(":")
    if prefix not in _SOURCES:
        raise SpecError(f"unknown model source {prefix!r} in {spec!r}{did_you_mean(prefix, _SOURCES)}; "
                        f"accepted: {', '.join(p + ':' for p in sorted(_SOURCES))}")
    model, record = _SOURCES[prefix](rest, dict(args or {}))
    record = {"spec": spec, **record}  # an artifact's record names its own base spec
    if weights is not None:
        from ..weights import load_weights_into
        load_weights_into(model, weights)
        record["weights"] = str(weights)
    object.__setattr__(model, SOURCE_ATTR, record)
    if not hasattr(model, EDITS_ATTR):
        object.__setattr__(model, EDITS_ATTR, [])
    if output is not None or record.get("output") is not None:
        set_output(model, output if output is not None else record["output"])
    return model


def rebuild_from_source(record: dict[str, Any]) -> nn.Module:
    """Rebuild the bare architecture (random init) described by a source record."""
    spec = record.get("spec", "")
    prefix = spec.partition(":")[0]
    rebuild = _REBUILDERS.get(prefix)
    if rebuild is not None:
        model = rebuild(record)
        object.__setattr__(model, SOURCE_ATTR, dict(record))
        object.__setattr__(model, EDITS_ATTR, [])
        if record.get("output") is not None:
            set_output(model, record["output"])
        return model
    return build_model(spec, args=record.get("args"), output=record.get("output"))


def source_record(spec: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The source record of ``spec`` built with ``args``: what an artifact stores to rebuild the
    architecture. The model is built on the meta device (nothing allocated) and dropped.

    Examples
    --------
    >>> source_record("zoo:lenet-5")
    {'spec': 'zoo:lenet-5', 'args': {}}
    """
    import torch

    if spec.startswith("artifact:"):
        raise SpecError(f"source {spec!r}: give the spec of the architecture (py:FILE.py:FACTORY, zoo:, "
                        "torchvision:, hf:), not an artifact")
    try:
        with torch.device("meta"):
            model = build_model(spec, args=args)
    except SpecError:  # a builder that computes with its tensors needs real ones
        model = build_model(spec, args=args)
    return dict(getattr(model, SOURCE_ATTR))


def attach_source(model: nn.Module, spec: str, args: dict[str, Any] | None = None) -> nn.Module:
    """Record on a module of your own how its architecture is rebuilt (``py:FILE.py:FACTORY``
    called with ``args``, or any model spec), so that :func:`torchslim.save` can save it and
    ``artifact:DIR`` load it. Returns ``model``; its weights are not touched.

    Examples
    --------
    >>> from torch import nn
    >>> m = attach_source(nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
    ...                                 nn.ReLU(), nn.Linear(100, 10)), "zoo:lenet-300-100")
    >>> getattr(m, SOURCE_ATTR)["spec"]
    'zoo:lenet-300-100'
    """
    object.__setattr__(model, SOURCE_ATTR, source_record(spec, args))
    if not hasattr(model, EDITS_ATTR):
        object.__setattr__(model, EDITS_ATTR, [])
    return model


# prefix -> fn(record) -> module, for sources whose spec alone cannot rebuild (hf: config inline)
_REBUILDERS: dict[str, Callable[[dict], nn.Module]] = {}


def register_rebuilder(prefix: str) -> Callable:
    def deco(fn: Callable[[dict], nn.Module]) -> Callable:
        _REBUILDERS[prefix] = fn
        return fn
    return deco


def _call_with_args(fn: Callable, args: dict, what: str) -> nn.Module:
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as exc:
        raise SpecError(f"{what}: bad arguments {args}: {exc}") from None
    except ValueError:
        pass  # builtins without a signature
    try:
        return fn(**args)
    except SpecError:
        raise
    except Exception as exc:  # a builder's own checks (assert, RuntimeError, ...) on bad arguments
        raise SpecError(f"{what}: cannot build with arguments {args}: {type(exc).__name__}: {exc}") from exc  # --debug shows the user's own traceback


@register_model_source("zoo")
def _zoo(name: str, args: dict) -> tuple[nn.Module, dict]:
    if name not in ZOO:
        raise SpecError(f"unknown zoo model {name!r}{did_you_mean(name, ZOO)}; "
                        f"accepted: {', '.join('zoo:' + n for n in sorted(ZOO))}")
    return _call_with_args(ZOO[name], args, f"zoo:{name}"), {"args": args}


@register_model_source("torchvision")
def _torchvision(name: str, args: dict) -> tuple[nn.Module, dict]:
    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        raise SpecError(f"unknown torchvision model {name!r}{did_you_mean(name, available)}")
    if "weights" in args:
        raise SpecError("torchvision models are built with random init here; give a local weights file "
                        "with --weights or model.weights instead of a torchvision weights name")
    return _call_with_args(lambda **kw: tvm.get_model(name, weights=None, **kw), args,
                           f"torchvision:{name}"), {"args": args}


def _load_py_factory(ref: str) -> Callable:
    # ref = FILE.py:FACTORY ; FILE may itself contain ':' on some systems, so split from the right
    path_s, sep, factory = ref.rpartition(":")
    if not sep or not path_s.endswith(".py") or not factory:
        raise SpecError(f"py: spec must be py:FILE.py:FACTORY, got 'py:{ref}'")
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise SpecError(f"py: file not found: {path} (a Python file defining {factory}())")
    mod_name = f"_torchslim_user_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        module = sys.modules[mod_name]
    else:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise SpecError(f"py: importing {path} failed: {type(exc).__name__}: {exc}") from exc  # --debug shows the user's own traceback
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise SpecError(f"py: {path} has no callable {factory!r}{did_you_mean(factory, names)}")
    return fn


@register_model_source("py")
def _py(ref: str, args: dict) -> tuple[nn.Module, dict]:
    fn = _load_py_factory(ref)
    model = _call_with_args(fn, args, f"py:{ref}")
    if not isinstance(model, nn.Module):
        raise SpecError(f"py:{ref} returned {type(model).__name__}, not an nn.Module")
    path_s, _, factory = ref.rpartition(":")
    return model, {"args": args, "file": str(Path(path_s).resolve()), "factory": factory}


@register_rebuilder("py")
def _py_rebuild(record: dict) -> nn.Module:
    return _py(f"{record['file']}:{record['factory']}", dict(record.get("args") or {}))[0]
