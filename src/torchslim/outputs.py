"""Which of a model's outputs is the prediction: the one place tuples, dicts and output objects
are resolved.

A model may return a tensor, a tuple or list (``(logits, features)``), a mapping
(``{"logits": ..., "aux": ...}``, a Hugging Face ``ModelOutput``) or a namedtuple (torchvision's
``GoogLeNetOutputs`` in train mode). The task's loss and metric, the trainer, distillation,
measurement and ONNX export all take the prediction through :func:`prediction`.

The choice, an *output selector*, is an index (``0``) or a name (``"logits"``): a mapping key
or namedtuple field. It is kept on the module (:func:`set_output`; recipes say
``model: {spec: ..., output: logits}``, the CLI ``--output``) and recorded in the artifact's
source record, so ``artifact:DIR`` models keep it. Without one, the choice is automatic where it
is unambiguous: a tensor; a mapping or namedtuple holding ``logits``; a container holding exactly
one tensor. Anything else raises :class:`OutputError` describing the structure seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import UserError

#: attribute of a module holding its output selector
OUTPUT_ATTR = "_torchslim_output"
#: the name picked automatically from a mapping or namedtuple
AUTO_NAME = "logits"


class OutputError(UserError):
    """A model output from which the prediction cannot be chosen (ambiguous or a bad selector)."""


def parse_selector(value: Any, where: str = "output") -> int | str | None:
    """An output selector from user input: ``None``, an int, or a string (digits give an int).

    Examples
    --------
    >>> parse_selector("0"), parse_selector("logits"), parse_selector(None)
    (0, 'logits', None)
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return int(text) if text.lstrip("-").isdigit() else text
    raise OutputError(f"{where}: an output is chosen by an index (0) or a name (logits), got {value!r}")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def describe(out: Any, depth: int = 0) -> str:
    """A one-line description of an output's structure.

    Examples
    --------
    >>> describe((torch.zeros(1, 10), torch.zeros(1, 64)))
    'tuple of 2: [0] Tensor(1x10), [1] Tensor(1x64)'
    >>> describe({"logits": torch.zeros(2, 3), "aux": None})
    "dict of 2: ['logits'] Tensor(2x3), ['aux'] None"
    """
    if isinstance(out, torch.Tensor):
        return f"Tensor({_shape(out)})"
    if depth > 1:
        return type(out).__name__
    if isinstance(out, Mapping):
        items = ", ".join(f"[{k!r}] {describe(v, depth + 1)}" for k, v in out.items())
        return f"{type(out).__name__} of {len(out)}: {items}"
    if isinstance(out, (tuple, list)):
        fields = getattr(out, "_fields", None)
        keys = [repr(f) for f in fields] if fields else [str(i) for i in range(len(out))]
        items = ", ".join(f"[{k}] {describe(v, depth + 1)}" for k, v in zip(keys, out))
        return f"{type(out).__name__} of {len(out)}: {items}"
    return "None" if out is None else type(out).__name__


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors at the top level of a model output ``out`` (a tuple, list, dict or
    ``ModelOutput``), in order; nested containers are left out."""
    items = out.values() if isinstance(out, Mapping) else out
    return [v for v in items if isinstance(v, torch.Tensor)]


def _how(out: Any) -> str:
    example = "output: 0" if isinstance(out, (tuple, list)) and not hasattr(out, "_fields") else "output: NAME"
    return (f"choose the prediction with `{example}` under `model:` in the recipe (model: {{spec: ..., "
            f"{example}}}), --output on the command line, or torchslim.outputs.set_output(model, ...) in Python")


def select(out: Any, selector: int | str | None = None, what: str = "the model") -> torch.Tensor:
    """The prediction tensor of the output ``out`` of a model.

    Parameters
    ----------
    out : Tensor, tuple, list, mapping or namedtuple
    selector : int or str, optional
        An index (into a tuple or list, or the entries of a mapping in order) or a name (a
        mapping key or namedtuple field); ``None`` chooses automatically.
    what : str
        Names the model in errors.

    Raises
    ------
    OutputError
        ``selector`` is None and the choice is ambiguous, or ``selector`` does not name a tensor
        in ``out``; the message describes the structure seen and how to choose.

    Examples
    --------
    >>> select((torch.zeros(1, 10), torch.zeros(1, 64)), 1).shape
    torch.Size([1, 64])
    >>> select({"logits": torch.zeros(1, 3), "hidden": torch.zeros(1, 8)}).shape
    torch.Size([1, 3])
    >>> select({"logits": torch.zeros(1, 3), "hidden": torch.zeros(1, 8)}, 1).shape
    torch.Size([1, 8])
    """
    if selector is None:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping) and isinstance(out.get(AUTO_NAME), torch.Tensor):
            return out[AUTO_NAME]
        if AUTO_NAME in (getattr(out, "_fields", None) or ()) and isinstance(getattr(out, AUTO_NAME), torch.Tensor):
            return getattr(out, AUTO_NAME)
        if isinstance(out, (Mapping, tuple, list)):
            found = output_tensors(out)
            if len(found) == 1:
                return found[0]
            raise OutputError(f"{what} returns {describe(out)}: which output is the prediction is "
                              f"ambiguous; {_how(out)}")
        raise OutputError(f"{what} returns {describe(out)}, not a tensor: return a tensor, a tuple, "
                          "a mapping or a namedtuple of tensors")
    got: Any = None
    if isinstance(out, Mapping):
        got = out.get(selector)
        values = list(out.values())  # else an index counts the entries in order, as ModelOutput[i] does
        if got is None and isinstance(selector, int) and -len(values) <= selector < len(values):
            got = values[selector]
    elif isinstance(out, (tuple, list)):
        if isinstance(selector, int) and -len(out) <= selector < len(out):
            got = out[selector]
        elif isinstance(selector, str) and selector in (getattr(out, "_fields", None) or ()):
            got = getattr(out, selector)
    elif isinstance(out, torch.Tensor) and selector in (0, -1):
        got = out  # a model that returns the prediction alone in eval mode (googlenet)
    if not isinstance(got, torch.Tensor):
        raise OutputError(f"{what}: output {selector!r} is not a tensor of its output, which is "
                          f"{describe(out)}; {_how(out)}")
    return got


def get_output(model: nn.Module) -> int | str | None:
    """The output selector kept on ``model`` (through a DDP or compile wrapper), or None."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and hasattr(m, OUTPUT_ATTR):
            return getattr(m, OUTPUT_ATTR)
    return None


def set_output(model: nn.Module, selector: int | str | None) -> nn.Module:
    """Keep ``selector`` (see :func:`select`) on ``model`` and in its source record; returns it.

    Examples
    --------
    >>> m = set_output(nn.Linear(2, 2), "logits")
    >>> get_output(m)
    'logits'
    """
    from .modules import SOURCE_ATTR

    selector = parse_selector(selector)
    object.__setattr__(model, OUTPUT_ATTR, selector)
    record = getattr(model, SOURCE_ATTR, None)
    if isinstance(record, dict):
        if selector is None:
            record.pop("output", None)
        else:
            record["output"] = selector
    return model


@contextlib.contextmanager
def selected_output(model: nn.Module, selector: int | str | None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s output selector is ``selector``; the previous one (or none)
    is restored after."""
    had, before = hasattr(model, OUTPUT_ATTR), get_output(model)
    set_output(model, selector)
    try:
        yield model
    finally:
        if had:
            set_output(model, before)
        else:
            set_output(model, None)
            object.__delattr__(model, OUTPUT_ATTR)


def prediction(model: nn.Module, out: Any, what: str = "the model") -> torch.Tensor:
    """The prediction in ``out``, the output of ``model``, as the model's selector says."""
    return select(out, get_output(model), what)
