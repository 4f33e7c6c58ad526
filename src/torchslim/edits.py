"""The edit log: how a changed architecture is rebuilt from its source without pickles.

A model built by torchslim carries an ordered list of *edits* on itself. Every change a method
makes to the architecture goes through one of the functions here, which applies the change and
appends a small JSON record; :func:`torchslim.save` writes the list into the manifest and
:func:`torchslim.load` rebuilds the source architecture (on the meta device) and replays each
record with the restore function registered for its ``op``, then loads the stored tensors in
their stored dtypes (after ModelOpt's convert/restore modes, STYLE.md R15).

Built-in ops (a record is ``{"op": ..., "target": MODULE_NAME, ...}``):

==========  ===================================================================================
``module``  put a rebuilt module at ``target`` (``class`` + constructor ``args``): quantized
            layers, a conv/linear/norm/embedding resized by structured pruning
            (:func:`replace_module`)
``setattr`` set attribute ``attr`` (dotted: ``config.num_attention_heads``) of module
            ``target`` to the JSON value ``value`` (:func:`set_attribute`)
``delete``  remove module ``target``; in an ``nn.ModuleList``/``nn.Sequential`` with numbered
            entries the later ones are renumbered, as ``del`` does; named entries (a ViT's
            ``encoder_layer_3``) keep their names (:func:`delete_module`)
``tensor``  replace the parameter or buffer ``target`` (full state_dict name) by an empty one
            of ``shape`` (a ViT position embedding resized); values come from the artifact
            (:func:`resize_tensor`)
==========  ===================================================================================

A method that needs another kind of change registers ``@register_edit("op", keys={...})`` with a
restore function ``fn(model, record)``; the loader never changes.

Examples
--------
>>> import torch, torchslim
>>> m = torchslim.build_model("zoo:lenet-300-100")
>>> replace_module(m, "1", torch.nn.Linear(784, 200))      # 300 -> 200 hidden units ...
>>> replace_module(m, "3", torch.nn.Linear(200, 100))      # ... and the consumer follows
>>> [e["op"] + ":" + e["target"] for e in edits_of(m)]
['module:1', 'module:3']
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError, did_you_mean
from .modules import EDITS_ATTR, build_from_record, get_submodule, module_rebuild_record


@dataclass(frozen=True)
class EditKind:
    """A registered edit: its restore function and the keys (with JSON types) a record needs."""

    op: str
    restore: Callable[[nn.Module, dict[str, Any]], None]
    keys: dict[str, tuple[type, ...]]


_EDITS: dict[str, EditKind] = {}


def register_edit(op: str, keys: dict[str, tuple[type, ...]] | None = None) -> Callable:
    """Register ``restore(model, record)`` replaying edit ``op`` (a decorator).

    ``keys`` maps each required record key (besides ``op`` and ``target``) to the JSON types
    it may have; records are checked against it before any is replayed.
    """
    def deco(fn: Callable[[nn.Module, dict[str, Any]], None]) -> Callable:
        _EDITS[op] = EditKind(op, fn, dict(keys or {}))
        return fn
    return deco


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the model's edit log (empty for an unedited model)."""
    return copy.deepcopy(list(getattr(model, EDITS_ATTR, [])))


def record_edit(model: nn.Module, op: str, target: str, **fields: Any) -> None:
    """Append ``{"op": op, "target": target, **fields}`` to the model's log (JSON values only).

    Methods call this after making a change that none of the built-in helpers covers.
    """
    if op not in _EDITS:
        raise ValueError(f"unknown edit op {op!r}{did_you_mean(op, _EDITS)}; register it with register_edit")
    record = {"op": op, "target": target, **fields}
    json.dumps(record)  # TypeError now, not at save time, for a value JSON cannot hold
    log = list(getattr(model, EDITS_ATTR, []))
    log.append(record)
    object.__setattr__(model, EDITS_ATTR, log)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if child not in parent._modules:
        raise AttributeError(f"{parent_name or 'the model'} has no child module {child!r}")
    return parent, child


# -- the built-in edits ---------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` and record how to rebuild it (class + constructor arguments).

    ``new``'s class must be registered with :func:`torchslim.modules.register_module_class`.
    """
    if not name:
        raise ValueError("cannot replace the root module")
    parent, child = _parent(model, name)
    record = module_rebuild_record(new)  # TypeError for an unregistered class, before any change
    setattr(parent, child, new)
    record_edit(model, "module", name, **record)


@register_edit("module", keys={"class": (str,), "args": (dict,)})
def _restore_module(model: nn.Module, record: dict[str, Any]) -> None:
    parent, child = _parent(model, record["target"])
    new = build_from_record(record)
    if not isinstance(new, nn.Module):
        raise TypeError(f"the builder returned {type(new).__name__}, not an nn.Module")
    setattr(parent, child, new)


def _split_attr(module: nn.Module, attr: str) -> tuple[Any, str]:
    *path, last = attr.split(".")
    obj: Any = module
    for part in path:
        obj = getattr(obj, part)
    return obj, last


def set_attribute(model: nn.Module, target: str, attr: str, value: Any) -> None:
    """Set ``attr`` (dotted, e.g. ``config.num_hidden_layers``) of module ``target`` ("" = the
    model) to a JSON value, and record it. Raises AttributeError when the attribute is absent."""
    obj, last = _split_attr(get_submodule(model, target), attr)
    if not hasattr(obj, last):
        raise AttributeError(f"{target or 'the model'}: no attribute {attr!r} to set")
    setattr(obj, last, value)
    record_edit(model, "setattr", target, attr=attr, value=value)


@register_edit("setattr", keys={"attr": (str,), "value": (int, float, str, bool, list, dict, type(None))})
def _restore_setattr(model: nn.Module, record: dict[str, Any]) -> None:
    obj, last = _split_attr(get_submodule(model, record["target"]), record["attr"])
    if not hasattr(obj, last):
        raise AttributeError(f"no attribute {record['attr']!r}")
    setattr(obj, last, record["value"])


def delete_module(model: nn.Module, name: str) -> None:
    """Remove module ``name``; numbered entries after it in a ModuleList/Sequential are renumbered."""
    _restore_delete(model, {"target": name})
    record_edit(model, "delete", name)


@register_edit("delete")
def _restore_delete(model: nn.Module, record: dict[str, Any]) -> None:
    name = record["target"]
    if not name:
        raise ValueError("cannot delete the root module")
    parent, child = _parent(model, name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        del parent[int(child)]
    else:
        delattr(parent, child)


def resize_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (a state_dict name) by ``value`` of another shape."""
    _put_tensor(model, name, value)
    record_edit(model, "tensor", name, shape=list(value.shape))


def _put_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = get_submodule(model, owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise AttributeError(f"{owner_name or 'the model'} has no parameter or buffer {attr!r}")


@register_edit("tensor", keys={"shape": (list,)})
def _restore_tensor(model: nn.Module, record: dict[str, Any]) -> None:
    name, shape = record["target"], record["shape"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape):
        raise ValueError(f"shape must be non-negative integers, got {shape}")
    owner_name, _, attr = name.rpartition(".")
    old = get_submodule(model, owner_name)._parameters.get(attr)
    if old is None:
        old = get_submodule(model, owner_name)._buffers.get(attr)
    if old is None:
        raise AttributeError(f"no parameter or buffer {name!r}")
    # the empty tensor is replaced by the artifact's values on load (on meta: nothing allocated)
    _put_tensor(model, name, torch.empty(shape, dtype=old.dtype, device=old.device))


# -- reading a log back ---------------------------------------------------------------------
def validate_edits(edits: Any, where: str) -> list[dict[str, Any]]:
    """Check a manifest's edit list before any of it is replayed; ArtifactError names the entry."""
    def bad(i: int, what: str) -> ArtifactError:
        return ArtifactError(f"{where}: malformed manifest: \"edits\"[{i}] {what}; the artifact is "
                             "damaged or was edited: save the model again")

    if not isinstance(edits, list):
        raise ArtifactError(f"{where}: malformed manifest: \"edits\" must be a list")
    for i, rec in enumerate(edits):
        if not isinstance(rec, dict):
            raise bad(i, "must be a mapping")
        op = rec.get("op")
        if not isinstance(op, str) or op not in _EDITS:
            raise bad(i, f"has unknown op {op!r}{did_you_mean(str(op), _EDITS)}; known: {', '.join(sorted(_EDITS))}")
        if not isinstance(rec.get("target"), str):
            raise bad(i, "needs a string 'target' (a module name)")
        for key, types in _EDITS[op].keys.items():
            value = rec.get(key, None) if key in rec else _MISSING
            if value is _MISSING or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise bad(i, f"({op}) needs {key!r} of type {'/'.join(t.__name__ for t in types)}")
    return edits


_MISSING = object()


def replay(model: nn.Module, edits: list[dict[str, Any]], where: str) -> None:
    """Apply ``edits`` in order with their restore functions; ArtifactError names the failing one."""
    for i, rec in enumerate(edits):
        try:
            _EDITS[rec["op"]].restore(model, rec)
        except Exception as exc:  # a builder or attribute path that does not fit this architecture
            text = " ".join(str(exc).split())[:300]
            raise ArtifactError(f"{where}: cannot replay edit {i} ({rec['op']} {rec['target']!r}): "
                                f"{type(exc).__name__}: {text}") from None
    object.__setattr__(model, EDITS_ATTR, copy.deepcopy(edits))
