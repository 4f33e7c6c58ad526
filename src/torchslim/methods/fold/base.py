"""What every folding method shares: ``targets``/``ignore`` and rebuilding a layer with new tensors.

Folding changes the architecture without changing what the model computes in eval mode (up to
float rounding); each change goes through :func:`torchslim.edits.replace_module` /
:func:`~torchslim.edits.delete_module`, so a folded model saves and reloads as plain torch.nn
layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import MethodConfig, option
from ...modules import build_from_record, module_rebuild_record


@dataclass(frozen=True)
class FoldConfig(MethodConfig):
    """Fields every folding method accepts (CONTRACT §4, ``fold``)."""

    targets: tuple[str, ...] = option(("re:.*",), doc="module names or re: patterns of the layers folded into "
                                                     "(the convolution or Linear that stays)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns left as they are")


def rebuilt(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, args: dict | None = None) -> nn.Module:
    """A new module of ``layer``'s (registered) class and constructor arguments, with ``args``
    overriding some (``{"bias": True, "out_features": 10}``), holding ``weight`` and ``bias``, on
    ``weight``'s device and dtype and in ``layer``'s train/eval mode."""
    record = module_rebuild_record(layer)
    record["args"].update(args or {})
    new = build_from_record(record).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(layer.training)


class OutputCheck:
    """The proof a fold step gives that the model computes the same: the largest absolute
    difference of the outputs before and after, on the task's example inputs (4 of them, eval
    mode), recorded in the step's row as ``max_abs_diff``. Without a task nothing is recorded.

    ``OutputCheck(model, session)`` keeps the outputs of ``model`` before folding (one forward
    pass); ``record(model)`` after it compares. Every output tensor counts (a Hugging Face model's
    hidden states and pooler output alike).
    """

    BATCH = 4

    def __init__(self, model: nn.Module, session) -> None:
        self.session = session
        self.inputs = self.before = None
        task = getattr(session, "task", None)
        if task is None:
            return
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.inputs = tuple(x.to(device) for x in task.example_inputs(self.BATCH))
        self.before = self._outputs(model)

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        from ...modules import eval_mode
        from ...outputs import output_tensors

        with eval_mode(model), torch.no_grad():
            out = model(*self.inputs)
        return [out] if isinstance(out, torch.Tensor) else output_tensors(out)

    def record(self, model: nn.Module) -> float | None:
        """Compare, put ``max_abs_diff`` (float) in the row and return it; None without a task."""
        if self.before is None:
            return None
        after = self._outputs(model)
        diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(self.before, after)), default=0.0)
        self.session.info.setdefault("metrics", {})["max_abs_diff"] = diff
        return diff
