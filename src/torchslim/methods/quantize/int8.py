"""Weights + activations int8 for ``quantize.linear`` (``activations: dynamic | static``).

Linear layers become :class:`~torchslim.layers.Int8Linear` (integer kernels), and with ``static``
Conv2d layers (symmetric codes) become :class:`~torchslim.layers.Int8Conv2d` (oneDNN); the other
targeted classes (Conv1d/3d, attention's packed projection, embeddings) keep weight-only codes, as
with ``activations: none``. Static scales come from calibration batches (``samples`` examples of the
task's train split, min/max observer); each layer's kernel is picked by timing it against float
compute at the rows the task's example inputs give it at batch 1 and 32 (``kernel: auto``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...layers.int8 import Int8Conv2d, Int8Linear, int8_engine, onednn_conv_available

log = logging.getLogger(__name__)

#: batch sizes whose shapes ``kernel: auto`` times (the batch sizes latency is reported at)
AUTO_BATCHES = (1, 32)


def _run(model: nn.Module, task: Any, batches: Sequence[Any]) -> None:
    with torch.inference_mode():
        for batch in batches:
            task.forward(model, batch)


def observe_ranges(model: nn.Module, names: Sequence[str], task: Any, batches: Sequence[Any]) -> dict[str, tuple[float, float]]:
    """min/max observer: ``name -> (min, max)`` of the inputs of each named module over
    ``batches`` (run in eval mode through ``task.forward``).

    Raises
    ------
    UserError
        When a layer's calibration inputs hold NaN or inf (naming the layer), or a layer never ran.
    """
    ranges: dict[str, list[float]] = {}
    bad: list[str] = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                bad.append(name)
                return
            lo, hi = float(x.min()), float(x.max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        _run(model, task, batches)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if bad:
        raise UserError(f"quantize: activations: static: the calibration inputs of {sorted(set(bad))[0]} hold "
                        "NaN or inf; fix the model or its data")
    missing = [n for n in names if n not in ranges]
    if missing:
        raise UserError(f"quantize: activations: static: {missing[0]} received no input on the calibration "
                        "batches (an unused layer?); add it to ignore")
    return {n: (r[0], r[1]) for n, r in ranges.items()}


def input_shapes(model: nn.Module, names: Sequence[str], task: Any, batch_sizes: Sequence[int]) -> dict[str, list[tuple[int, ...]]]:
    """``name -> [shape]``: the shape of the input each named module sees on the task's example
    inputs at each batch size."""
    shapes: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: shapes[n].append(tuple(args[0].shape))) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            for bs in batch_sizes:
                model(*task.example_inputs(bs))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def input_rows(model: nn.Module, names: Sequence[str], task: Any, batch_sizes: Sequence[int]) -> dict[str, list[int]]:
    """``name -> [rows]``: the number of input rows (all but the last dim) each named module
    sees on the task's example inputs at each batch size."""
    return {n: [math.prod(s[:-1]) for s in v] for n, v in input_shapes(model, names, task, batch_sizes).items()}


def time_forward(module: nn.Module, inputs: tuple, min_run_time: float) -> float:
    """Median milliseconds of ``module(*inputs)`` under ``inference_mode``
    (``torch.utils.benchmark`` ``blocked_autorange``, at the current thread count)."""
    from ...runtime import quiet_cpp_extension
    with quiet_cpp_extension():   # torch.utils.benchmark imports cpp_extension, which warns without CUDA
        from torch.utils import benchmark
    t = benchmark.Timer("m(*x)", globals={"m": module, "x": inputs}, num_threads=torch.get_num_threads())
    with torch.inference_mode():
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _faster(layer: Int8Linear | Int8Conv2d, inputs: Sequence[torch.Tensor], rounds: int,
            min_run_time: float) -> tuple[str, dict[str, list[float]]]:
    """``int8`` when the geometric mean over ``inputs`` of the layer's int8 time / its float
    (``dequant``) time is at most 1, else ``dequant``; the kernels timed in turns, ``rounds``
    times, median kept. Leaves ``layer.kernel`` set to the choice."""
    times: dict[str, list[float]] = {"int8": [], "dequant": []}
    for x in inputs:
        per: dict[str, list[float]] = {k: [] for k in times}
        for _ in range(rounds):
            for kernel in per:
                layer.kernel = kernel
                per[kernel].append(time_forward(layer, (x,), min_run_time))
        for k in times:
            times[k].append(round(statistics.median(per[k]), 4))
    ratio = math.prod(i / f for i, f in zip(times["int8"], times["dequant"])) ** (1 / len(inputs))
    layer.kernel = "int8" if ratio <= 1 else "dequant"
    return layer.kernel, times


def choose_kernel(layer: Int8Linear, rows: Sequence[int], rounds: int = 2,
                  min_run_time: float = 0.01) -> tuple[str, dict[str, Any]]:
    """``int8`` or ``dequant`` for ``layer``: ``int8`` when the geometric mean over inputs of
    ``rows`` rows of its time / float's time is at most 1, so each batch size weighs alike
    (kernels timed in turns, ``rounds`` times, median kept); ``reference``
    without an integer engine. Returns the kernel and what was measured
    (``{"rows": [...], "int8_ms": [...], "float_ms": [...]}``)."""
    if int8_engine() is None:
        return "reference", {}
    g = torch.Generator().manual_seed(0)
    kernel, times = _faster(layer, [torch.randn(r, layer.in_features, generator=g) for r in rows], rounds, min_run_time)
    return kernel, {"rows": list(rows), "int8_ms": times["int8"], "float_ms": times["dequant"]}


def choose_conv_kernel(layer: Int8Conv2d, shapes: Sequence[tuple[int, ...]], rounds: int = 2,
                       min_run_time: float = 0.01) -> tuple[str, dict[str, Any]]:
    """:func:`choose_kernel` for an :class:`~torchslim.layers.Int8Conv2d` on inputs of the given
    (N, C, H, W) ``shapes`` (uniform in its calibrated input range); ``reference`` without oneDNN.
    Returns the kernel and ``{"shapes": [...], "int8_ms": [...], "float_ms": [...]}``."""
    if not onednn_conv_available():
        return "reference", {}
    g = torch.Generator().manual_seed(0)
    lo = -float(layer.input_zero_point) * float(layer.input_scale)
    hi = lo + (2 ** layer.act_bits - 1) * float(layer.input_scale)
    inputs = [torch.rand(s, generator=g) * (hi - lo) + lo for s in shapes]
    kernel, times = _faster(layer, inputs, rounds, min_run_time)
    return kernel, {"shapes": [list(s) for s in shapes], "int8_ms": times["int8"], "float_ms": times["dequant"]}


def summary(model: nn.Module, activations: str, measured: dict[str, Any]) -> dict[str, Any]:
    """The metrics row's ``int8`` entry: the engine (and ``conv_engine`` with Int8Conv2d layers),
    how many int8 layers run each kernel, and per layer its kernel (with the timings ``kernel:
    auto`` took)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Conv2d))}
    counts: dict[str, int] = {}
    for m in layers.values():
        counts[m.kernel] = counts.get(m.kernel, 0) + 1
    engine = int8_engine()
    convs = {}
    if any(isinstance(m, Int8Conv2d) for m in layers.values()):
        convs = {"conv_engine": "oneDNN" if onednn_conv_available() else "none (float reference)",
                 "conv_kernel_op": "onednn.qconv2d_pointwise"}
    return {"activations": activations, "act_bits": sorted({m.act_bits for m in layers.values()}),
            "engine": f"torch.backends.quantized {engine}" if engine else "none (float reference)",
            "kernel_op": "quantized.linear_with_input_q_dq_qweight_dq_output_fp32",
            **convs, "kernels": counts,
            "layers": {n: {"kernel": m.kernel, **measured.get(n, {})} for n, m in layers.items()}}
