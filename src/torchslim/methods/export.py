"""``export`` step: write the model in shipping formats next to the artifact.

- ``artifact``: DIR/model (always written at the end of a run; listing it is allowed);
- ``onnx``: DIR/onnx/model.onnx, with the task's input and output names, a dynamic batch (and
  sequence length for token inputs) and the task's preprocessing in its ``metadata_props``
  (:func:`~torchslim.onnx_io.export_for_task`); checked against PyTorch with ONNX Runtime, whose
  latency is recorded in the step's metrics as ``onnx_latency_ms`` (medians) and ``onnx_latency``
  (per batch size ``median_ms``, ``iqr_ms``, ``cpu_ms``, ``runs``, ``threads``, ``unstable``, as
  ``latency``); written by the dynamo exporter (``exporter: dynamo``, falling back to TorchScript
  for a model it cannot trace) or the TorchScript one; quantized weights are stored as their
  integer codes behind Cast/Sub/Mul nodes, which a default ONNX Runtime session folds into float
  weights once at load (outputs as PyTorch's, speed as the float model's);
- ``torch-export``: DIR/torch-export/model.pt2 (``torch.export``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig, option
from ..errors import UserError
from ..fileio import atomic_path
from ..onnx_io import (TensorIO, _require_onnx, check_onnx, export_for_task, export_onnx,  # noqa: F401  (re-exported)
                       onnx_agreement, onnx_session)
from ..registry import register_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig(MethodConfig):
    """Formats to write.

    Examples
    --------
    >>> ExportConfig(formats=["artifact", "onnx"]).formats
    ('artifact', 'onnx')
    """

    RANK0_ONLY = True

    formats: tuple[str, ...] = option(("artifact",), choices=("artifact", "onnx", "torch-export"),
                                      doc="formats to write")
    opset: int = option(18, low=13, high=23, doc="ONNX opset (21 or more: 4-, 3- and 2-bit codes stored as INT4, two per "
                                                   "byte)")
    exporter: str = option("dynamo", choices=("dynamo", "torchscript"),
                           doc="torch.onnx exporter: dynamo (falls back to torchscript for a model it cannot "
                               "trace) or the deprecated torchscript one (faster to export)")
    atol: float = option(1e-4, low=0.0, low_open=True, doc="ONNX Runtime vs PyTorch: absolute tolerance")
    rtol: float = option(1e-4, low=0.0, doc="ONNX Runtime vs PyTorch: tolerance relative to max |output|")

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        if "onnx" in self.formats:
            _require_onnx()


@register_method("export.default", ExportConfig)
def _export(model: nn.Module, config: ExportConfig, ctx) -> nn.Module:
    """Write ONNX / torch.export files next to the artifact."""
    if ctx.out_dir is None:
        raise UserError("export needs an output directory (run it in a recipe or call export_onnx)")
    task = ctx.require_task("export")
    metrics = ctx.info.setdefault("metrics", {})
    if "onnx" in config.formats:
        from ..measure import measure_onnx_timings
        path = export_for_task(model, task, Path(ctx.out_dir) / "onnx" / "model.onnx", config.opset,
                               exporter=config.exporter)
        diff, cosine = onnx_agreement(model, path, task.example_inputs(4), config.atol, config.rtol)
        metrics["onnx_max_abs_diff"], metrics["onnx_cosine_min"] = diff, round(cosine, 6)
        timings = measure_onnx_timings(path, task)
        metrics["onnx_latency_ms"] = {bs: round(t.median_ms, 4) for bs, t in timings.items()}
        metrics["onnx_latency"] = {bs: t.to_dict() for bs, t in timings.items()}
        log.info("exported %s (max abs diff vs PyTorch %.2e)", ctx.final_path(path), metrics["onnx_max_abs_diff"])
    if "torch-export" in config.formats:
        path = export_torch(model, task, Path(ctx.out_dir) / "torch-export" / "model.pt2", config)
        metrics["torch_export_dynamic_batch"] = path[1]
    return model


def export_torch(model: nn.Module, task, path: Path, config: ExportConfig) -> tuple[Path, bool]:
    """``torch.export`` with a dynamic batch dimension when the model allows one (else the
    example's batch size, with a warning); checked against eager PyTorch. Returns (path, dynamic)."""
    model = TensorIO(model).eval()
    inputs = task.example_inputs(2)          # batch 2: size-1 dimensions would be specialized
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = True
    try:
        # TensorIO.forward(*inputs): one varargs parameter holding every input
        ep = torch.export.export(model, inputs, dynamic_shapes=(tuple({0: batch} for _ in inputs),))
    except Exception as exc:  # data-dependent shapes, specialized batch, ...
        log.warning("torch.export: no dynamic batch for this model (%s); exporting batch size %d only",
                    str(exc).splitlines()[0][:160], inputs[0].shape[0])
        ep, dynamic = torch.export.export(model, inputs), False
    check = task.example_inputs(3 if dynamic else 2)
    with torch.no_grad():
        want, got = model(*check), ep.module()(*check)
    diff = float((got - want).abs().max())
    if diff > config.atol + config.rtol * float(want.abs().max()):
        raise RuntimeError(f"torch.export output differs from eager PyTorch by {diff:.3g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.export.save(ep, str(tmp))
    return path, dynamic
