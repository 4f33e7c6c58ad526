"""Measurement: one function, used for every step, so every row of a report is comparable.

- ``params``: number of elements of all parameters *and* buffers that hold weights (quantized
  layers keep their int8 weights in buffers), excluding BatchNorm running statistics.
- ``nonzero_params``: the same elements that are not zero.
- ``size_bytes``: bytes on disk of the artifact torchslim writes for the model (all files).
- ``macs``: multiply-accumulates of one forward pass at batch size 1, counted by tracing the
  forward with ``torch.utils.flop_counter.FlopCounterMode`` (aten ``mm``/``addmm``/``bmm``/
  ``convolution``/``scaled_dot_product_attention``, FLOPs / 2). Attention score and value
  matmuls are therefore counted, elementwise ops are not; zeros are counted (dense MACs).
- ``latency_ms``: median wall time of a forward pass per batch size, after warm-up, in eager
  PyTorch under ``torch.inference_mode`` with the process's thread count.
- ``metric``: the task metric on the test split (``None`` for ``shape:`` tasks).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import artifact_size, save
from .specs.tasks import Task, _device_of, to_device

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, nonzero_params)`` over parameters and weight-holding buffers."""
    total = nonzero = 0
    seen: set[int] = set()
    # buffers count when they hold weights: float tensors or 8-bit codes; int64 index buffers
    # (BERT's position_ids), BatchNorm statistics, scales and zero points do not
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if not n.endswith(_STAT_BUFFERS)
        and (b.is_floating_point() or b.dtype in (torch.int8, torch.uint8))
        and not n.endswith(("mask", "scale", "zero_point"))]
    for _, t in tensors:
        if id(t) in seen:       # tied weights count once
            continue
        seen.add(id(t))
        total += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero


def count_macs(model: nn.Module, inputs: tuple) -> int:
    """MACs of one forward pass on ``inputs`` (see module docstring for what is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    # nn.MultiheadAttention's inference fast path is one fused op the counter cannot see into
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            _call(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def _extra_flop_formulas() -> dict:
    """FLOP formulas PyTorch's counter lacks: the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` dispatches to on CPU (same formula as the GPU kernels)."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_flash}


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def measure_latency(model: nn.Module, inputs: tuple, *, warmup: int = 3, repeats: int = 15,
                    min_time_s: float = 0.2) -> float:
    """Median milliseconds of ``model(*inputs)`` after warm-up."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            _call(model, inputs)
        start_all = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start_all < min_time_s and len(times) < 200):
            t0 = time.perf_counter()
            _call(model, inputs)
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def measure(model: nn.Module, task: Task | None, *, batch_sizes: Sequence[int] = (1, 32),
            artifact_dir: str | Path | None = None, metric: bool = True,
            latency: bool = True) -> dict[str, Any]:
    """Measure a model the same way for every step; returns the fields of a metrics.json step.

    ``artifact_dir``: where the model was (or is to be) saved; its size on disk is reported.
    When not given the model is saved to a temporary directory to measure its size.
    """
    params, nonzero = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": nonzero}
    if artifact_dir is not None and Path(artifact_dir).is_dir():
        out["size_bytes"] = artifact_size(artifact_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out["size_bytes"] = save(model, Path(tmp) / "model")
    device = _device_of(model)
    if task is not None:
        inputs = to_device(task.example_inputs(1), device)
        out["macs"] = count_macs(model, inputs)
        if latency:
            out["latency_ms"] = {
                str(bs): round(measure_latency(model, to_device(task.example_inputs(bs), device)), 4)
                for bs in batch_sizes
            }
        value = task.evaluate(model) if metric else None
        out["metric"] = None if value is None or task.metric_name is None else {
            "name": task.metric_name, "value": round(float(value), 6),
            "higher_is_better": task.higher_is_better}
    return out


def measure_latency_onnx(path: str | Path, task: Task, batch_sizes: Sequence[int] = (1, 32)) -> dict[str, float]:
    """Median ms per batch size of an ONNX model under ONNX Runtime (CPU provider)."""
    from .methods.export import onnx_session

    sess = onnx_session(Path(path))
    names = [i.name for i in sess.get_inputs()]
    out = {}
    for bs in batch_sizes:
        feed = {n: t.cpu().numpy() for n, t in zip(names, task.example_inputs(bs))}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        t_start = time.perf_counter()
        while len(times) < 15 or (time.perf_counter() - t_start < 0.2 and len(times) < 200):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[str(bs)] = round(statistics.median(times), 4)
    return out
