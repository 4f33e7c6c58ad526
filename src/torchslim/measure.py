"""Measurement: one function, used for every step, so every row of a report is comparable.

- ``params``: number of elements of all parameters *and* buffers that hold weights (quantized
  layers keep their int8 weights in buffers), excluding BatchNorm running statistics.
- ``nonzero_params``: the same elements that are not zero.
- ``size_bytes``: bytes on disk of the artifact torchslim writes for the model (all files).
- ``bits_per_nonzero``: bits on disk per stored non-zero of the tensors the artifact keeps in a
  sparse encoding (values and index data; see :func:`bits_per_nonzero`); absent when none is.
- ``macs``: multiply-accumulates of one forward pass at batch size 1, counted by tracing the
  forward with ``torch.utils.flop_counter.FlopCounterMode`` (aten ``mm``/``addmm``/``bmm``/
  ``convolution``/``scaled_dot_product_attention``, FLOPs / 2). Attention score and value
  matmuls are therefore counted, elementwise ops are not; zeros are counted (dense MACs).
- ``latency_ms``: per batch size (as a string), the median milliseconds of one forward pass on
  the step's runtime (``eager`` by default: eval mode, ``torch.inference_mode``) with the
  process's thread count, timed by ``torch.utils.benchmark`` after warm-up (see :func:`time_fn`).
- ``latency``: per batch size, ``median_ms``, ``iqr_ms``, ``cpu_ms`` (process CPU time per
  call), ``runs``, ``threads``, and ``unstable: true`` when IQR / median stayed above 0.25.
- ``runtime``: ``{"name", "threads", "omp_wait_policy"}`` in force while timing, plus the
  runtime session's ``details`` (``sparse``: ``sparse_layers``); the session's ``fields`` become
  fields of the row (``sparse``: ``sparse_speedup``, ``"none"`` when no layer runs sparse).
- ``metric``: the task metric on the ``split`` asked for (test by default; ``None`` for
  ``shape:`` tasks).
- ``input_shapes``: the shapes of the example inputs latency and MACs are taken on, at batch
  size 1 (one list per model input; latency replaces the leading 1 by each batch size), e.g.
  ``[[1, 16]]`` for 16 token ids.
- ``layers``: one compact entry per module that holds weights itself (see
  :func:`layer_summary`): name, type, weight shape, params, non-zeros, MACs, and ``bits`` for
  quantized layers.
"""

from __future__ import annotations

import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import MANIFEST, artifact_size, encoded_bytes, save, state_dict_size
from .encodings import ENCODINGS, stored_nonzeros
from .modules import SOURCE_ATTR, eval_mode
from .outputs import prediction, selected_output
from .runtime import RuntimeSession, get_runtime, omp_wait_policy, quiet_cpp_extension
from .specs.tasks import Task, _device_of, to_device



from .layers.counting import count_params  # noqa: E402  (re-exported: measure.count_params)


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a module's output: itself, or the first in a tuple, list or mapping
    (Hugging Face outputs are mappings)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((o for o in items if isinstance(o, torch.Tensor)), None)


def _traced_pass(model: nn.Module, inputs: Any, hooks: bool = False) -> tuple[Any, dict[str, tuple]]:
    """One eval-mode, no-grad forward under ``FlopCounterMode``: the counter, and with ``hooks``
    each module's output shape (first tensor of its output) by module name."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: dict[str, tuple] = {}
    handles = []
    if hooks:
        for name, mod in model.named_modules():
            def hook(m, args, out, name=name):
                t = _first_tensor(out)
                if t is not None:
                    shapes.setdefault(name, tuple(t.shape))
            handles.append(mod.register_forward_hook(hook))
    # nn.MultiheadAttention's inference fast path is one fused op the counter cannot see into
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    from .layers.quantized import float_compute  # integer kernels are ops the counter does not know
    try:
        with eval_mode(model), torch.no_grad(), float_compute(), FlopCounterMode(display=False,
                                                                custom_mapping=_extra_flop_formulas()) as counter:
            _call(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    return counter, shapes


def count_macs(model: nn.Module, inputs: tuple) -> int:
    """MACs of one forward pass on ``inputs`` (see module docstring for what is counted)."""
    counter, _ = _traced_pass(model, inputs)
    return int(counter.get_total_flops() // 2)


def layer_table(model: nn.Module, task: Task | None = None) -> list[dict[str, Any]]:
    """One row per module (the model first, as ``""``): name, type, parameters and non-zeros
    under it, and with a task its MACs (batch 1, as :func:`count_macs` counts them) and output
    shape on the task's example input. The names are what ``targets:``/``ignore:`` take.

    Examples
    --------
    >>> import torchslim
    >>> rows = layer_table(torchslim.build_model("zoo:lenet-5"), torchslim.build_task("shape:1x28x28"))
    >>> [(r["name"], r["type"], r["params"], r["macs"], r["output_shape"]) for r in rows[:2]]
    [('', 'Sequential', 431080, 2293000, (1, 10)), ('0', 'Conv2d', 520, 288000, (1, 20, 24, 24))]
    """
    macs: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    if task is not None:
        inputs = to_device(task.example_inputs(1), _device_of(model))
        counter, shapes = _traced_pass(model, inputs, hooks=True)
        root = type(model).__name__
        for key, ops in counter.get_flop_counts().items():
            if key == "Global":
                continue
            name = "" if key == root else key.removeprefix(root + ".")
            macs[name] = int(sum(ops.values()) // 2)
    rows = []
    for name, mod in model.named_modules():
        params, nonzero = count_params(mod)
        rows.append({"name": name, "type": type(mod).__name__, "params": params, "nonzero_params": nonzero,
                     "macs": macs.get(name, 0 if task is not None else None),
                     "output_shape": shapes.get(name)})
    return rows


def layer_summary(model: nn.Module, counter: Any = None) -> list[dict[str, Any]]:
    """The ``layers`` field of a metrics row: one entry per module holding weights of its own.

    Each entry: ``name`` (as ``targets:`` takes it), ``type``, ``shape`` (of its weight, e.g.
    ``[out_channels, in_channels, kh, kw]``; ``None`` when it has no ``weight``), ``params`` and
    ``nonzero`` (the module's own weights, :func:`count_params` rules), ``macs`` (batch 1, from
    ``counter``, a ``FlopCounterMode`` of one traced pass; omitted without one) and ``bits`` for a
    quantized layer. Modules without weights (activations, containers) are left out, so the list
    stays small.

    Examples
    --------
    >>> import torchslim
    >>> rows = layer_summary(torchslim.build_model("zoo:lenet-300-100"))
    >>> [(r["name"], r["type"], r["shape"], r["params"]) for r in rows][:1]
    [('1', 'Linear', [300, 784], 235500)]
    """
    flops: dict[str, int] = {}
    if counter is not None:
        root = type(model).__name__
        for key, ops in counter.get_flop_counts().items():
            if key != "Global":
                flops["" if key == root else key.removeprefix(root + ".")] = int(sum(ops.values()) // 2)
    rows = []
    for name, mod in model.named_modules():
        own = hasattr(mod, "slim_weights") or next(mod.parameters(recurse=False), None) is not None
        if not own:
            continue
        if hasattr(mod, "slim_weights"):
            params, nonzero = count_params(mod, recurse=False)  # its children have rows of their own
        else:  # the module's own parameters only, not its children's
            ps = list(mod.parameters(recurse=False))
            params = sum(p.numel() for p in ps)
            nonzero = sum(int(torch.count_nonzero(p.detach())) for p in ps)
        weight = getattr(mod, "weight_q", None)
        if not isinstance(weight, torch.Tensor):
            weight = getattr(mod, "weight", None) if not hasattr(mod, "slim_weights") else None
        row = {"name": name, "type": type(mod).__name__,
               "shape": list(weight.shape) if isinstance(weight, torch.Tensor) else None,
               "params": params, "nonzero": nonzero}
        if counter is not None:
            row["macs"] = flops.get(name, 0)
        if isinstance(getattr(mod, "bits", None), int):
            row["bits"] = mod.bits
        rows.append(row)
    return rows


def input_shapes(inputs: Any) -> list[list[int]]:
    """Shapes of the tensors of ``inputs`` (a tuple, or a mapping of keyword inputs), in order."""
    items = inputs.values() if isinstance(inputs, dict) else inputs
    return [list(t.shape) for t in items if isinstance(t, torch.Tensor)]


def _extra_flop_formulas() -> dict:
    """FLOP formulas PyTorch's counter lacks: the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` dispatches to on CPU (same formula as the GPU kernels), and
    oneDNN's LSTM layer kernel (``mkldnn_rnn_layer``, one call per layer and direction), which
    multiplies every time step of every sequence by ``w_ih`` (4H x I) and ``w_hh`` (4H x H):
    MACs = steps x batch x (4H x I + 4H x H). (GRU and RNN on CPU decompose into counted
    ``addmm``.)"""
    from torch.utils.flop_counter import sdpa_flop_count

    formulas = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        formulas[op] = cpu_flash
    lstm = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)
    if lstm is not None:
        def lstm_layer(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
            rows = math.prod(input_shape[:-1])  # steps x batch, whichever comes first
            return 2 * rows * (math.prod(w_ih_shape) + math.prod(w_hh_shape))

        formulas[lstm] = lstm_layer
    return formulas


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def check_runs(model: nn.Module, task: Task | None, what: str = "the model", *, trains: bool = False) -> None:
    """Raise a SpecError unless ``model`` runs on ``task``'s example inputs (a model built for
    28x28 images given 8x8 digits, token ids given to an image model, ...), and an
    :class:`~torchslim.outputs.OutputError` when its prediction cannot be chosen from what it
    returns (a tuple of several tensors without a selector). With ``trains``, the prediction
    is also chosen from a train-mode output (googlenet returns a namedtuple only then); that
    forward leaves buffers (BatchNorm statistics) and the random state as they were."""
    if task is None:
        return
    from .errors import SpecError

    inputs = task.example_inputs(2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _call(model, to_device(inputs, _device_of(model)))
    except Exception as exc:  # whatever the model raises on inputs it cannot take
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs
                           if isinstance(t, torch.Tensor))
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SpecError(f"{what} does not run on the inputs of task {task.spec!r} ({shapes}): "
                        f"{type(exc).__name__}: {first}") from exc  # --debug shows the user's own traceback
    finally:
        model.train(was_training)
    if task.outputs == "logits" and task.metric_name is not None:  # the metric needs the prediction
        scores = prediction(model, out, what)
        classes = task.num_classes()
        if classes is not None and isinstance(scores, torch.Tensor) and scores.dim() >= 1 \
                and scores.shape[-1] < classes:
            raise SpecError(f"{what} outputs {scores.shape[-1]} class scores, but task {task.spec!r} has "
                            f"{classes} classes (labels 0..{classes - 1}); build it with {classes} outputs "
                            f"(zoo models: args: {{num_classes: {classes}}})")
        if trains:
            buffers = {k for k, _ in model.named_buffers()}
            saved = {k: v.clone() for k, v in model.state_dict().items() if k in buffers}
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                model.train()
                try:
                    out = _call(model, to_device(inputs, _device_of(model)))
                except Exception:  # noqa: BLE001  (the trainer reports what fails in train mode)
                    out = None
                finally:
                    model.load_state_dict(saved, strict=False)
                    model.train(was_training)
            if out is not None:
                prediction(model, out, f"{what} (in train mode)")


#: IQR / median above which a timing is taken again (and flagged ``unstable`` if it stays so)
UNSTABLE_ABOVE = 0.25


@dataclass(frozen=True)
class Timing:
    """One latency figure: per-call statistics of a timed callable.

    ``median_ms`` / ``iqr_ms``: median and interquartile range of the timed blocks (milliseconds
    per call); ``cpu_ms``: process CPU time per call (all threads); ``runs``: timed calls;
    ``threads``: torch intra-op threads in force; ``unstable``: IQR / median stayed above
    :data:`UNSTABLE_ABOVE` in every attempt.
    """

    median_ms: float
    iqr_ms: float
    cpu_ms: float
    runs: int
    threads: int
    unstable: bool = False

    @property
    def dispersion(self) -> float:
        """IQR / median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The ``latency`` entry of a metrics row (``unstable`` only when true)."""
        out = {"median_ms": round(self.median_ms, 4), "iqr_ms": round(self.iqr_ms, 4),
               "cpu_ms": round(self.cpu_ms, 4), "runs": self.runs, "threads": self.threads}
        if self.unstable:
            out["unstable"] = True
        return out


@functools.cache
def _timer_class() -> type:
    """The timer class, built on first use: importing ``torch.utils.benchmark`` pulls in the C++
    extension helpers, which on a CUDA build without a GPU log a CUDA_HOME warning at import;
    the import is kept out of ``import torchslim`` and that one warning is muted."""
    with quiet_cpp_extension():
        from torch.utils import benchmark
        from torch.utils.benchmark.utils.common import set_torch_threads

    class _Timer(benchmark.Timer):
        """``torch.utils.benchmark.Timer`` with smaller blocks, and a count of every call it makes.

        torch blocks calls until the timer's own overhead is 0.01% of a block, so a block of a
        0.1 ms forward holds 1000 calls and averages their spread away. Here a block grows only
        until that overhead is under 1% (single calls from about 20 µs on), so the IQR shows the
        spread of calls. (Overrides a private hook; on a torch without it, torch's blocks are used.)
        """

        calls = 0

        def _timeit(self, number: int) -> float:
            self.calls += number
            return super()._timeit(number)

        def _estimate_block_size(self, min_run_time: float) -> int:
            with set_torch_threads(self._task_spec.num_threads):
                overhead = statistics.median(self._timeit(0) for _ in range(5))
                number = 1
                while True:
                    taken = self._timeit(number)
                    if taken >= 100 * overhead or taken > min_run_time or number >= 10**8:
                        return number
                    number *= 10

    return _Timer


def time_fn(fn: Callable[[], Any], *, min_run_time: float = 0.2, warmup: int = 3, attempts: int = 3,
            threads: int | None = None, device: torch.device | str = "cpu",
            unstable_above: float = UNSTABLE_ABOVE) -> Timing:
    """Time ``fn`` with ``torch.utils.benchmark``: ``blocked_autorange(min_run_time)`` after
    ``warmup`` calls, at ``threads`` intra-op threads (default: the current count).

    When IQR / median is above ``unstable_above`` the measurement is taken again, up to
    ``attempts`` in all; the attempt with the smallest IQR / median is kept, flagged
    ``unstable`` if even that one is above. ``device``: an accelerator is synchronized around
    each block. CPU time per call is the process's CPU time over the measurement (every thread,
    so spinning worker threads show) divided by the calls it made.
    """
    threads = torch.get_num_threads() if threads is None else int(threads)
    timer = dict(timer=time.perf_counter) if torch.device(device).type == "cpu" else {}
    t = _timer_class()(stmt="fn()", globals={"fn": fn}, num_threads=threads, **timer)
    if warmup > 0:
        t.timeit(warmup)
    best: Timing | None = None
    for _ in range(max(1, attempts)):
        calls, cpu0 = t.calls, time.process_time()
        m = t.blocked_autorange(min_run_time=min_run_time)
        cpu = (time.process_time() - cpu0) / max(t.calls - calls, 1)
        timing = Timing(m.median * 1e3, m.iqr * 1e3, cpu * 1e3, len(m.times) * m.number_per_run, threads)
        if best is None or timing.dispersion < best.dispersion:
            best = timing
        if best.dispersion <= unstable_above:
            return best
    return replace(best, unstable=True)


def time_session(session: RuntimeSession, inputs: tuple, **kwargs: Any) -> Timing:
    """Time one forward pass of a runtime session on ``inputs`` (see :func:`time_fn`; the
    session's thread count and device are used)."""
    with session.bind(inputs) as run:
        return time_fn(run, **{"threads": session.threads, "device": session.device, **kwargs})


def time_call(fn: Callable[[], Any], **kwargs: Any) -> float:
    """Milliseconds per call of ``fn``: the median of :func:`time_fn` (``min_run_time``,
    ``warmup``, ``attempts``, ``threads`` pass through).

    Examples
    --------
    >>> time_call(lambda: sum(range(100)), min_run_time=0.01) > 0
    True
    """
    return time_fn(fn, **kwargs).median_ms


def measure_latency(model: nn.Module, inputs: tuple, **kwargs: Any) -> float:
    """Milliseconds per forward pass of ``model`` on ``inputs`` in eager PyTorch
    (``inference_mode``, eval mode); see :func:`time_fn` for how the figure is taken."""
    with get_runtime("eager") as rt:
        return time_session(rt.prepare(model, inputs), inputs, **kwargs).median_ms


def measure_runtime_latency(model: nn.Module, task: Task, runtime: str = "eager",
                            batch_sizes: Sequence[int] = (1, 32), report: dict[str, Any] | None = None,
                            **kwargs: Any) -> dict[str, Timing]:
    """``{batch size: Timing}`` of ``model``'s forward pass on ``runtime`` (prepared once, on
    the batch-size-1 inputs), on ``task``'s example inputs; ``kwargs`` go to :func:`time_fn`.
    ``report``: filled with what the session found in its preparation, if anything:
    ``{"details": ..., "fields": ...}`` (the ``sparse`` runtime's per-layer choices)."""
    device = _device_of(model)
    with get_runtime(runtime) as rt:
        session = rt.prepare(model, to_device(task.example_inputs(1), device))
        if report is not None:
            report.update(details=getattr(session, "details", {}), fields=getattr(session, "fields", {}))
        return {str(bs): time_session(session, to_device(task.example_inputs(bs), device), **kwargs)
                for bs in batch_sizes}


def runtime_info(runtime: str = "eager", threads: int | None = None) -> dict[str, Any]:
    """The ``runtime`` field of a metrics row: name, intra-op threads, OpenMP wait policy."""
    return {"name": runtime, "threads": torch.get_num_threads() if threads is None else threads,
            "omp_wait_policy": omp_wait_policy()}


def measure(model: nn.Module, task: Task | str | None, *, batch_sizes: Sequence[int] = (1, 32),
            artifact_dir: str | Path | None = None, metric: bool = True,
            latency: bool = True, runtime: str = "eager", split: str = "test",
            min_run_time: float = 0.2, output: int | str | None = None) -> dict[str, Any]:
    """Measure a model the same way for every step; returns the fields of a metrics.json step.

    ``model``: any module; ``task``: a :class:`Task` or a task spec string.
    ``artifact_dir``: where the model was (or is to be) saved; its size on disk is reported.
    When not given the model is saved to a temporary directory to measure its size; a module
    torchslim did not build (no source record, see :func:`torchslim.specs.attach_source`) is
    sized as its state_dict written to one safetensors file.
    ``output``: which output is the prediction when the model returns a tuple or mapping (an
    index or a name, :mod:`torchslim.outputs`); default: the model's own selector, else automatic.
    ``runtime``: the registered runtime (:mod:`torchslim.runtime`) whose forward pass is timed;
    ``split``: the split the metric is computed on (``test`` for reports, ``val`` for searches);
    ``min_run_time``: seconds of timed calls per batch size and attempt (:func:`time_fn`).

    Examples
    --------
    >>> import torchslim
    >>> r = torchslim.measure(torchslim.build_model("zoo:lenet-5"), torchslim.build_task("shape:1x28x28"),
    ...                       batch_sizes=(1,))
    >>> r["params"], r["macs"], r["metric"]
    (431080, 2293000, None)
    """
    if isinstance(task, str):
        from .specs.tasks import build_task
        task = build_task(task)
    if output is not None:
        with selected_output(model, output):
            return measure(model, task, batch_sizes=batch_sizes, artifact_dir=artifact_dir, metric=metric,
                           latency=latency, runtime=runtime, split=split, min_run_time=min_run_time)
    check_runs(model, task)  # a model that does not fit the task: a SpecError naming both, not a trace
    params, nonzero = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": nonzero}
    storage = None
    if artifact_dir is not None and Path(artifact_dir).is_dir():
        out["size_bytes"] = artifact_size(artifact_dir)
        storage = encoded_bytes(artifact_dir) if (Path(artifact_dir) / MANIFEST).is_file() else None
    elif getattr(model, SOURCE_ATTR, None) is None:
        out["size_bytes"] = state_dict_size(model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out["size_bytes"] = save(model, Path(tmp) / "model")
            storage = encoded_bytes(Path(tmp) / "model")
    bits = bits_per_nonzero(model, storage or {})
    if bits is not None:
        out["bits_per_nonzero"] = bits
    device = _device_of(model)
    if task is not None:
        inputs = to_device(task.example_inputs(1), device)
        counter, _ = _traced_pass(model, inputs)
        out["macs"] = int(counter.get_total_flops() // 2)
        out["input_shapes"] = input_shapes(inputs)
        out["layers"] = layer_summary(model, counter)
        if latency:
            prepared: dict[str, Any] = {}
            timings = measure_runtime_latency(model, task, runtime, batch_sizes, report=prepared,
                                              min_run_time=min_run_time)
            out["latency_ms"] = {bs: round(t.median_ms, 4) for bs, t in timings.items()}
            out["latency"] = {bs: t.to_dict() for bs, t in timings.items()}
            out["runtime"] = {**runtime_info(runtime, next(iter(timings.values())).threads if timings else None),
                              **prepared["details"]}
            out.update(prepared["fields"])
        value = task.evaluate(model, split=split) if metric else None
        out["metric"] = None if value is None or task.metric_name is None else {
            "name": task.metric_name, "value": round(float(value), 6),
            "higher_is_better": task.higher_is_better, "split": split}
    else:
        out["layers"] = layer_summary(model)
    return out


def bits_per_nonzero(model: nn.Module, storage: dict[str, tuple[str, int]]) -> float | None:
    """Bits on disk per stored non-zero of the tensors the artifact keeps in a sparse encoding
    (``bitmask``, ``relative-index``, ``nm``: values and index data together), from
    :func:`~torchslim.artifact.encoded_bytes`; None when no tensor is stored sparse. A float32
    weight costs 32 bits dense: 2:4 in ``nm`` takes 33.5 bits a non-zero, 90% unstructured in
    ``relative-index`` about 37 (LeNet-300-100 at 90%)."""
    state = model.state_dict()
    bits = nonzero = 0
    for name, (encoding, nbytes) in storage.items():
        if ENCODINGS[encoding].sparse and name in state:
            bits += 8 * nbytes
            nonzero += stored_nonzeros(state[name].detach().cpu())
    return round(bits / nonzero, 3) if nonzero else None


def measure_latency_onnx(path: str | Path, task: Task, batch_sizes: Sequence[int] = (1, 32),
                         **kwargs: Any) -> dict[str, float]:
    """Median milliseconds per run of an ONNX file under the ``onnxruntime`` runtime (CPU
    provider), per batch size, timed as every runtime is (:func:`time_session`)."""
    return {bs: round(t.median_ms, 4) for bs, t in measure_onnx_timings(path, task, batch_sizes, **kwargs).items()}


def measure_onnx_timings(path: str | Path, task: Task, batch_sizes: Sequence[int] = (1, 32),
                         **kwargs: Any) -> dict[str, Timing]:
    """``{batch size: Timing}`` of an ONNX file under the ``onnxruntime`` runtime (CPU provider):
    median, IQR, CPU time, runs and threads, as :func:`measure_runtime_latency` gives for PyTorch."""
    with get_runtime("onnxruntime") as rt:
        session = rt.load(path)
        return {str(bs): time_session(session, task.example_inputs(bs), **kwargs) for bs in batch_sizes}
