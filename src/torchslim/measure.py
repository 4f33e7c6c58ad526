"""Measurement: one function, used for every step, so every row of a report is comparable.

- ``params``: number of elements of all parameters *and* buffers that hold weights (quantized
  layers keep their int8 weights in buffers), excluding BatchNorm running statistics.
- ``nonzero_params``: the same elements that are not zero.
- ``size_bytes``: bytes on disk of the artifact torchslim writes for the model (all files).
- ``macs``: multiply-accumulates of one forward pass at batch size 1, counted by tracing the
  forward with ``torch.utils.flop_counter.FlopCounterMode`` (aten ``mm``/``addmm``/``bmm``/
  ``convolution``/``scaled_dot_product_attention``, FLOPs / 2). Attention score and value
  matmuls are therefore counted, elementwise ops are not; zeros are counted (dense MACs).
- ``latency_ms``: milliseconds of a forward pass per batch size in eager PyTorch under
  ``torch.inference_mode`` with the process's thread count: after warm-up, the smallest of 5
  round medians (see :func:`time_call`).
- ``metric``: the task metric on the test split (``None`` for ``shape:`` tasks).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
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


def check_runs(model: nn.Module, task: Task | None, what: str = "the model") -> None:
    """Raise a SpecError unless ``model`` runs on ``task``'s example inputs (a model built for
    28x28 images given 8x8 digits, token ids given to an image model, ...)."""
    if task is None:
        return
    from .errors import SpecError

    inputs = task.example_inputs(2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, to_device(inputs, _device_of(model)))
    except Exception as exc:  # whatever the model raises on inputs it cannot take
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs
                           if isinstance(t, torch.Tensor))
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SpecError(f"{what} does not run on the inputs of task {task.spec!r} ({shapes}): "
                        f"{type(exc).__name__}: {first}") from None
    finally:
        model.train(was_training)


def time_call(fn: Callable[[], Any], *, warmup: int = 3, rounds: int = 5, min_runs: int = 5,
              min_round_s: float = 0.05) -> float:
    """Milliseconds per call of ``fn``: the smallest of ``rounds`` round medians, after warm-up.

    Each round runs ``fn`` at least ``min_runs`` times and for at least ``min_round_s``. On a
    shared machine other work only ever adds time, so the least disturbed round is the closest
    to the model's own cost; a burst of contention spoils one round, not the figure.
    """
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(rounds):
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_round_s and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        medians.append(statistics.median(times))
    return min(medians)


def measure_latency(model: nn.Module, inputs: tuple, **kwargs: Any) -> float:
    """Milliseconds per forward pass of ``model`` on ``inputs`` in eager PyTorch
    (``inference_mode``, eval mode); see :func:`time_call` for how the figure is taken."""
    model.eval()
    with torch.inference_mode():
        return time_call(lambda: _call(model, inputs), **kwargs)


def measure(model: nn.Module, task: Task | None, *, batch_sizes: Sequence[int] = (1, 32),
            artifact_dir: str | Path | None = None, metric: bool = True,
            latency: bool = True) -> dict[str, Any]:
    """Measure a model the same way for every step; returns the fields of a metrics.json step.

    ``artifact_dir``: where the model was (or is to be) saved; its size on disk is reported.
    When not given the model is saved to a temporary directory to measure its size.

    Examples
    --------
    >>> import torchslim
    >>> r = torchslim.measure(torchslim.build_model("zoo:lenet-5"), torchslim.build_task("shape:1x28x28"),
    ...                       batch_sizes=(1,))
    >>> r["params"], r["macs"], r["metric"]
    (431080, 2293000, None)
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
    """Milliseconds per run of an ONNX model under ONNX Runtime (CPU provider), per batch size,
    taken as :func:`time_call` says."""
    from .methods.export import onnx_session

    sess = onnx_session(Path(path))
    names = [i.name for i in sess.get_inputs()]
    out = {}
    for bs in batch_sizes:
        feed = {n: t.cpu().numpy() for n, t in zip(names, task.example_inputs(bs))}
        out[str(bs)] = round(time_call(lambda feed=feed: sess.run(None, feed)), 4)
    return out
