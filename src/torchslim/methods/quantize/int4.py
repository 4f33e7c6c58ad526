"""Weight-only int4 on PyTorch's CPU kernel for ``quantize.linear`` (``kernel: int4pack | auto``).

With ``activations: none``, bits 4 and granularity ``group``, Linear layers the kernel can take
(:func:`~torchslim.layers.int4.int4_refusal`) become :class:`~torchslim.layers.Int4Linear`.
``kernel: int4pack`` runs the kernel at every input size; ``kernel: auto`` times the *whole
model* (the task's example inputs at each of :data:`AUTO_BATCHES`, the layers on the kernel
against the dequantized weight, in turns, a few rounds) and lets each layer run the kernel up to
the rows it sees at the largest batch size where the kernel won, counting up from batch 1 and
stopping at the first loss (``max_rows``; 0 with ``kernel: dequant`` when it never won). Per
layer timings cannot decide: with the weight hot in cache the kernel always loses, while end to
end on a model whose float weights exceed the cache it wins at small batches (BENCHMARKS.md,
"Weight-only int4"). The choice and the timings go to the step's row (``int4``).
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...layers.int4 import Int4Linear, int4_kernel_available, int4_refusal
from .int8 import AUTO_BATCHES, input_rows, time_forward

log = logging.getLogger(__name__)

#: timing of ``kernel: auto``: rounds (in turns), and seconds per ``blocked_autorange``
ROUNDS, MIN_RUN_TIME = 3, 0.05
KERNEL_OP = "aten._weight_int4pack_mm_for_cpu"


def int4_applies(config: Any) -> bool:
    """Whether ``config`` (a LinearQuantConfig) is weight-only 4-bit group quantization, the
    only kind the int4 kernel runs."""
    return config.activations == "none" and config.bits == 4 and config.granularity == "group"


def int4_refusals(named: Sequence[tuple[str, nn.Linear]], group_size: int) -> list[tuple[str, str]]:
    """``(name, why)`` for each Linear the int4 kernel cannot run."""
    return [(n, why) for n, m in named
            if (why := int4_refusal(m.in_features, m.out_features, 4, "group", group_size))]


def _time_model(model: nn.Module, inputs: tuple, min_run_time: float) -> float:
    """Median milliseconds of ``model(*inputs)``, after one call that builds the packed /
    dequantized weights outside the timing."""
    with torch.inference_mode():
        model(*inputs)
    return time_forward(model, inputs, min_run_time)


def choose_max_rows(model: nn.Module, names: Sequence[str], task: Any, qargs: dict[str, Any],
                    batch_sizes: Sequence[int] = AUTO_BATCHES, rounds: int | None = None,
                    min_run_time: float | None = None) -> tuple[dict[str, int], dict[str, Any]]:
    """Time a copy of ``model`` with the named Linears as :class:`Int4Linear` on ``int4pack``
    and on ``dequant`` at the task's example inputs of each batch size (kernels in turns,
    ``rounds`` times, median kept; ``rounds`` / ``min_run_time`` default to :data:`ROUNDS` /
    :data:`MIN_RUN_TIME`).

    Returns ``({name: max_rows}, measured)``: ``max_rows`` is the rows the layer saw at the
    largest batch size of the run of wins starting at the smallest (0 when the kernel lost at
    the smallest); ``measured`` is ``{"batch_sizes", "int4pack_ms", "dequant_ms",
    "max_batch_size"}`` (whole-model milliseconds per batch size; ``max_batch_size`` 0: never).
    """
    rounds, min_run_time = rounds or ROUNDS, min_run_time or MIN_RUN_TIME
    trial = copy.deepcopy(model).cpu().eval()
    layers = []
    for n in names:        # a throwaway copy: plain module swaps, no edit records
        layer = Int4Linear.from_float(trial.get_submodule(n), kernel="int4pack", **qargs).eval()
        trial.set_submodule(n, layer)
        layers.append(layer)
    sizes = sorted(batch_sizes)
    inputs = {bs: tuple(task.example_inputs(bs)) for bs in sizes}
    times: dict[str, dict[int, list[float]]] = {k: {bs: [] for bs in sizes} for k in ("int4pack", "dequant")}
    for _ in range(rounds):
        for bs in sizes:
            for kernel, per in times.items():
                for layer in layers:
                    layer.kernel = kernel
                per[bs].append(_time_model(trial, inputs[bs], min_run_time))
    ms = {k: [round(statistics.median(per[bs]), 3) for bs in sizes] for k, per in times.items()}
    best = 0
    for bs, i4, dq in zip(sizes, ms["int4pack"], ms["dequant"]):
        if i4 >= dq:
            break
        best = bs
    rows = {n: 0 for n in names}
    if best:
        seen = input_rows(trial, names, task, (best,))
        rows = {n: max(seen[n], default=0) for n in names}
    return rows, {"batch_sizes": sizes, "int4pack_ms": ms["int4pack"], "dequant_ms": ms["dequant"],
                  "max_batch_size": best}


def int4_plan(model: nn.Module, config: Any, ctx: Any, linears: Sequence[tuple[str, nn.Linear]],
              qargs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """``({name: Int4Linear.from_float kernel arguments}, the row's int4 entry or None)`` for
    the chosen Linears: every one with ``kernel: int4pack`` (the config refused unfit ones
    before), those the kernel takes with ``kernel: auto`` on a CPU model with a task; empty
    otherwise (the layers stay ``QuantLinear``)."""
    if not int4_applies(config) or config.kernel not in ("auto", "int4pack"):
        return {}, None
    if config.kernel == "int4pack":
        plan = {n: {"kernel": "int4pack", "max_rows": None} for n, _ in linears}
        return plan, {"kernel": "int4pack", "op": KERNEL_OP, "activations": "bfloat16", "layers": len(plan),
                      "max_rows": None}
    unfit = dict(int4_refusals(linears, config.group_size))
    names = [n for n, _ in linears if n not in unfit]
    task = getattr(ctx, "task", None)
    device = getattr(ctx, "device", torch.device("cpu"))
    if not names or task is None or not int4_kernel_available() or torch.device(device).type != "cpu":
        log.info("quantize: kernel auto keeps weight-only int4 on the dequantized weight (%s)",
                 "no Linear fits the int4 kernel" if not names else "no task to time on" if task is None
                 else "no CPU int4 kernel" if not int4_kernel_available() else "the model is not on CPU")
        return {}, None
    rows, measured = choose_max_rows(model, names, task, qargs)
    never = measured["max_batch_size"] == 0
    plan = {n: {"kernel": "dequant" if never else "int4pack", "max_rows": rows[n]} for n in names}
    entry = {"kernel": "dequant" if never else "int4pack", "op": KERNEL_OP, "activations": "bfloat16",
             "layers": len(plan), "max_rows": sorted(set(rows.values())), **measured}
    if never:
        entry["note"] = "the int4 kernel was slower than the dequantized weight at every timed batch size"
    if unfit:
        entry["dequant_layers"] = {n: why for n, why in list(unfit.items())[:8]}
    return plan, entry
