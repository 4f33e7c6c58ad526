"""Runtimes: what runs a model's forward pass when torchslim measures its latency.

A :class:`Runtime` turns a model into a :class:`RuntimeSession` (``prepare``); a session runs one
forward pass per call, and :meth:`RuntimeSession.bind` hands a timer the cheapest possible statement
for given inputs (inputs converted once, mode switches entered once). Built-in runtimes:

- ``eager``: the model itself, in eval mode, under ``torch.inference_mode``;
- ``compile``: ``torch.compile`` of the model, compiled in ``prepare`` (and, for a new input
  shape, in ``bind``), never while timed;
- ``onnxruntime``: the model exported with :func:`torchslim.onnx_io.export_onnx` to a
  temporary ONNX file and run by ONNX Runtime's CPU provider (:func:`~torchslim.onnx_io.onnx_session`);
- ``sparse``: eager, with each sparse linear layer in CSR form where that measured faster
  (:class:`SparseRuntime`; what it measured and chose goes into the metrics row).

A session may carry what its preparation found: ``details`` (recorded in the metrics row's
``runtime``) and ``fields`` (top-level fields of the row, shown in the report's step details).

A new runtime (integer kernels, another engine) is a :class:`Runtime` subclass registered with
``@register_runtime("name")``; ``measure(..., runtime="name")`` and recipes' ``measure.runtime``
then accept it.

Examples
--------
>>> import torch, torchslim
>>> model = torchslim.build_model("zoo:lenet-5")
>>> x = torch.randn(2, 1, 28, 28)
>>> with get_runtime("eager") as rt:
...     session = rt.prepare(model, (x,))
...     session(x).shape
torch.Size([2, 10])
>>> get_runtime("eagre")
Traceback (most recent call last):
...
torchslim.errors.RecipeError: unknown runtime 'eagre' (did you mean 'eager' or 'sparse'?); runtimes: compile, eager, onnxruntime, sparse
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .errors import RecipeError, UserError, did_you_mean
from .outputs import get_output, select
from .specs.tasks import _device_of

__all__ = ["Runtime", "RuntimeSession", "register_runtime", "get_runtime", "runtime_class", "list_runtimes",
           "omp_wait_policy"]


def omp_wait_policy() -> str:
    """The ``OMP_WAIT_POLICY`` torch's OpenMP threads run with: the value in the environment
    when torch was first imported (``torchslim`` sets ``PASSIVE`` unless the user chose one, or
    torch was imported before torchslim), ``"default"`` when none was set."""
    import torchslim

    policy = getattr(torchslim, "_OMP_WAIT_POLICY", None)
    if policy is None:
        policy = os.environ.get("OMP_WAIT_POLICY")
    return policy or "default"   # an empty value is OpenMP's default too


def _output_tensor(out: Any) -> Any:
    """The model's output as one tensor: the first of a tuple/list (as ONNX export keeps it), the
    first field of a Hugging Face output object."""
    while True:
        if hasattr(out, "to_tuple"):          # transformers ModelOutput
            out = out.to_tuple()
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif isinstance(out, dict) and out:
            out = next(iter(out.values()))
        else:
            return out


class RuntimeSession:
    """A model prepared on one runtime; calling it runs one forward pass.

    Owns what its runtime built for the model (a compiled function, an ONNX Runtime session, a
    temporary file) and releases it in :meth:`close`. It does not copy the model: an eager or
    compiled session sees later changes to the model's parameters, an ONNX session does not.

    Attributes
    ----------
    runtime : str
        Name of the runtime that made it.
    threads : int
        Intra-op threads its forward pass runs with.
    device : torch.device
        Where its forward pass runs (timers synchronize it when it is an accelerator).

    Notes
    -----
    Not thread-safe: use a session from one thread at a time. Closing twice is allowed; calling
    a closed session is not.
    """

    runtime: str = ""

    def __init__(self, *, threads: int, device: torch.device | str = "cpu") -> None:
        self.threads = int(threads)
        self.device = torch.device(device)
        self.closed = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One forward pass on ``inputs``; returns the model's output tensor (the first tensor
        when the model returns several, as in ONNX export)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def bind(self, inputs: tuple) -> Iterator[Callable[[], Any]]:
        """Context giving a no-argument callable that runs one forward pass on ``inputs``: the
        statement a timer repeats. Conversions (to NumPy, ...) and mode switches happen once,
        here, and anything still to compile for these shapes is compiled before it yields.
        Its return value is whatever the runtime returns (not converted)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        """Release what the session holds (idempotent)."""
        self.closed = True

    def __enter__(self) -> "RuntimeSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Runtime:
    """What runs a model's forward pass: makes :class:`RuntimeSession` objects from models.

    Contract
    --------
    - ``name``: the registry name (set by :func:`register_runtime`).
    - ``prepare(model, example_inputs) -> RuntimeSession``: everything slow (export, compilation,
      session creation) happens here, on ``example_inputs`` (a tuple of tensors, as
      ``Task.example_inputs`` gives), never in a timed region. The model runs in eval mode; its
      training flag is restored at the latest when the session closes. Its weights are not changed.
      Subclasses implement :meth:`build_session`; ``prepare`` tracks what it returns.
    - ``close()``: closes every session this runtime prepared and still holds (temporary
      files, compiled code); idempotent. A runtime is also a context manager that closes on exit.
    - ``check_available()`` (class method): raises when the runtime cannot run on this machine.

    Ownership and thread safety: a runtime owns the sessions it prepared; a session owns its
    compiled artifacts. Neither is thread-safe; use one runtime and its sessions from one
    thread. Timing (``torchslim.measure``) sets torch's intra-op thread count for the duration of
    a measurement, a process-wide setting.

    Raises
    ------
    UserError
        From the constructor, ``check_available`` and ``prepare`` when the runtime cannot run here:
        a missing optional package (``pip install 'torchslim[onnx]'``), a model ``torch.compile``
        or ONNX export cannot handle on this machine.
    Exception
        Whatever the model itself raises on ``example_inputs`` propagates unchanged.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        type(self).check_available()
        self._sessions: list[RuntimeSession] = []

    @classmethod
    def check_available(cls) -> None:
        """Raise a :class:`~torchslim.errors.UserError` when the runtime cannot run here (a
        missing package); the default accepts."""

    def prepare(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        """A session running ``model`` on inputs shaped like ``example_inputs`` (batch size may vary)."""
        session = self.build_session(model, tuple(example_inputs))
        self._sessions.append(session)
        return session

    def build_session(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        """Make the session (subclasses implement this; :meth:`prepare` calls it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every session prepared by this runtime (idempotent)."""
        while self._sessions:
            self._sessions.pop().close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- registry ---------------------------------------------------------------------------------
_RUNTIMES: dict[str, type[Runtime]] = {}
R = TypeVar("R", bound=type[Runtime])


def register_runtime(name: str) -> Callable[[R], R]:
    """Class decorator registering a :class:`Runtime` subclass under ``name`` (sets ``cls.name``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"runtime name must be a non-empty string, got {name!r}")

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Runtime)):
            raise TypeError(f"runtime {name!r}: {cls!r} is not a Runtime subclass")
        old = _RUNTIMES.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"runtime {name!r} is already registered ({old.__qualname__})")
        cls.name = name
        _RUNTIMES[name] = cls
        return cls

    return deco


def list_runtimes() -> tuple[str, ...]:
    """Registered runtime names, sorted."""
    return tuple(sorted(_RUNTIMES))


def runtime_class(name: str) -> type[Runtime]:
    """The class registered under ``name``; a RecipeError naming close matches otherwise."""
    cls = _RUNTIMES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise RecipeError(f"unknown runtime {name!r}{did_you_mean(str(name), _RUNTIMES)}; "
                          f"runtimes: {', '.join(list_runtimes())}")
    return cls


def get_runtime(name: str, **options: Any) -> Runtime:
    """A new runtime instance (``options`` go to its constructor); close it when done.

    Raises :class:`~torchslim.errors.RecipeError` for an unknown name (with close matches) and
    :class:`~torchslim.errors.UserError` when the runtime cannot run here.
    """
    return runtime_class(name)(**options)


# -- eager ------------------------------------------------------------------------------------
class EagerSession(RuntimeSession):
    """The model (or a function standing for it) called under ``torch.inference_mode``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any] | None = None,
                 runtime: str = "eager") -> None:
        super().__init__(threads=torch.get_num_threads(), device=_device_of(model))
        self.runtime = runtime
        self.model = model
        self._was_training = model.training
        model.eval()
        self._fn = model if fn is None else fn

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._fn(*inputs)
        selector = get_output(self.model)  # the model's chosen prediction, as ONNX export keeps it
        return _output_tensor(out) if selector is None else select(out, selector)

    @contextlib.contextmanager
    def bind(self, inputs: tuple) -> Iterator[Callable[[], Any]]:
        fn, inputs = self._fn, tuple(inputs)
        with torch.inference_mode():
            yield lambda: fn(*inputs)

    def close(self) -> None:
        if not self.closed:
            self.model.train(self._was_training)
        super().close()


@register_runtime("eager")
class EagerRuntime(Runtime):
    """Eager PyTorch: the model in eval mode under ``torch.inference_mode``."""

    def build_session(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        return EagerSession(model, runtime=self.name)


# -- torch.compile ----------------------------------------------------------------------------
class CompiledSession(EagerSession):
    """A ``torch.compile``-d model; ``bind`` compiles for new input shapes before yielding."""

    @contextlib.contextmanager
    def bind(self, inputs: tuple) -> Iterator[Callable[[], Any]]:
        with super().bind(inputs) as run:
            _compile_now(run, self.runtime)
            yield run


@contextlib.contextmanager
def quiet_cpp_extension() -> Iterator[None]:
    """Mute the one warning ``torch.utils.cpp_extension`` logs when first imported by a CUDA
    build of torch on a machine without CUDA ("No CUDA runtime is found, using CUDA_HOME=...");
    ``torch.utils.benchmark`` and ``torch.compile`` import it."""
    import logging

    lg = logging.getLogger("torch.utils.cpp_extension")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _compile_now(run: Callable[[], Any], name: str) -> None:
    try:
        with quiet_cpp_extension():
            run()
    except Exception as exc:  # inductor/dynamo failures: no C++ compiler, unsupported ops, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"runtime {name!r}: torch.compile could not compile the model here "
                        f"({type(exc).__name__}: {first}); use runtime 'eager'") from exc


@register_runtime("compile")
class CompileRuntime(Runtime):
    """``torch.compile(model, **options)`` (``mode``, ``backend``, ``dynamic``, ...), compiled on
    the example inputs in ``prepare``."""

    def __init__(self, **compile_options: Any) -> None:
        super().__init__()
        self.compile_options = compile_options

    def build_session(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        session = CompiledSession(model, torch.compile(model, **self.compile_options), runtime=self.name)
        try:
            with session.bind(example_inputs):
                pass
        except BaseException:
            session.close()
            raise
        return session


# -- ONNX Runtime -----------------------------------------------------------------------------
class OnnxSession(RuntimeSession):
    """An ONNX Runtime ``InferenceSession`` (CPU provider) on an ONNX file."""

    def __init__(self, path: Path, tmpdir: tempfile.TemporaryDirectory | None = None,
                 runtime: str = "onnxruntime") -> None:
        from .onnx_io import onnx_session

        self._tmpdir = tmpdir
        try:
            self._sess = onnx_session(Path(path))
        except BaseException:
            if tmpdir is not None:
                tmpdir.cleanup()
            raise
        threads = self._sess.get_session_options().intra_op_num_threads
        super().__init__(threads=threads or torch.get_num_threads())
        self.runtime = runtime
        self.path = Path(path)
        self._names = [i.name for i in self._sess.get_inputs()]

    def _feed(self, inputs: tuple) -> dict[str, Any]:
        return {n: t.detach().cpu().numpy() for n, t in zip(self._names, inputs)}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._sess.run(None, self._feed(inputs))[0])

    @contextlib.contextmanager
    def bind(self, inputs: tuple) -> Iterator[Callable[[], Any]]:
        sess, feed = self._sess, self._feed(tuple(inputs))
        yield lambda: sess.run(None, feed)

    def close(self) -> None:
        if not self.closed:
            self._sess = None
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
        super().close()


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime (CPU provider): ``prepare`` exports the model to a temporary ONNX file with a
    dynamic batch dimension (``torchslim.onnx_io.export_onnx``), removed on close;
    :meth:`load` opens an existing file. Threads: torch's intra-op thread count at session
    creation, without spinning worker threads. The temporary file is written by the TorchScript
    exporter (``exporter``), 10-30x faster to export than the dynamo one; the export step times
    the file it ships."""

    def __init__(self, opset: int = 18, exporter: str = "torchscript") -> None:
        super().__init__()
        self.opset, self.exporter = opset, exporter

    @classmethod
    def check_available(cls) -> None:
        from .onnx_io import _require_onnx

        try:
            _require_onnx()
        except UserError as exc:
            raise UserError(f"runtime {cls.name!r}: {exc}") from None

    def build_session(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        from .onnx_io import export_onnx

        tmp = tempfile.TemporaryDirectory(prefix="torchslim-onnx-")
        was_training = model.training
        try:
            path = export_onnx(model, example_inputs, Path(tmp.name) / "model.onnx", self.opset,
                               exporter=self.exporter)
        except BaseException:
            tmp.cleanup()
            raise
        finally:
            model.train(was_training)
        return OnnxSession(path, tmp, runtime=self.name)

    def load(self, path: str | Path) -> RuntimeSession:
        """A session on an existing ONNX file (left in place on close)."""
        session = OnnxSession(Path(path), runtime=self.name)
        self._sessions.append(session)
        return session


# -- sparse: CSR linear layers where measured faster -------------------------------------------
class SparseSession(EagerSession):
    """Eager session on a copy of the model whose linear layers run in CSR form where that was
    measured faster; ``details`` and ``fields`` say what was measured and chosen."""

    def __init__(self, model: nn.Module, details: dict[str, Any], fields: dict[str, Any],
                 runtime: str = "sparse") -> None:
        super().__init__(model, runtime=runtime)
        self.details, self.fields = details, fields


@register_runtime("sparse")
class SparseRuntime(Runtime):
    """Eager PyTorch with each sparse ``nn.Linear`` swapped for a
    :class:`~torchslim.layers.SparseLinear` (CSR weight, MKL sparse BLAS) where that was measured
    faster, on a copy of the model (the model itself is not changed).

    In ``prepare``, every float32 linear layer on the CPU with at least ``min_sparsity`` zeros
    in its weight is timed dense and in CSR on inputs of its own shape at batch sizes 1 and 32
    (its input captured on the example inputs; ``torch.utils.benchmark``, the two forms
    interleaved, ``rounds`` times ``min_run_time`` seconds each), and converted when CSR is at
    least ``margin`` times faster at both. The session's ``details`` (the metrics row's
    ``runtime.sparse_layers``) give per layer ``sparsity``, ``speedup`` (dense time / CSR time
    by batch size) and ``csr`` (converted or not); its ``fields`` give the row's
    ``sparse_speedup``: the converted layers' speed-ups, or ``"none"`` when no layer was
    converted (then the latency measured is the dense one, and no speed-up is claimed).

    Parameters
    ----------
    min_sparsity : float, default=0.5
        Layers with fewer zeros are not timed (CSR was never faster there on any CPU measured).
    margin : float, default=1.05
        Speed-up needed at both batch sizes to convert (timing noise is a few percent).
    """

    BATCHES = (1, 32)

    def __init__(self, min_sparsity: float = 0.5, margin: float = 1.05, rounds: int = 2,
                 min_run_time: float = 0.02) -> None:
        super().__init__()
        self.min_sparsity, self.margin, self.rounds, self.min_run_time = min_sparsity, margin, rounds, min_run_time

    def _candidates(self, model: nn.Module) -> dict[str, nn.Linear]:
        out = {}
        for name, m in model.named_modules():
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
                if float((m.weight == 0).float().mean()) >= self.min_sparsity:
                    out[name] = m
        return out

    def _speedups(self, linear: nn.Linear, rows: int) -> dict[str, float]:
        """Dense time / CSR time of ``linear`` on ``rows * batch`` input rows, per batch size."""
        from torch.utils import benchmark

        from .layers.sparse import SparseLinear
        sparse = SparseLinear.from_linear(linear).eval()
        out = {}
        with torch.inference_mode(), quiet_cpp_extension():
            for bs in self.BATCHES:
                x = torch.randn(rows * bs, linear.in_features)
                times: dict[str, list[float]] = {"dense": [], "csr": []}
                for _ in range(self.rounds):
                    for form, fn in (("dense", linear), ("csr", sparse)):
                        t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
                        times[form].append(t.blocked_autorange(min_run_time=self.min_run_time).median)
                out[str(bs)] = round(min(times["dense"]) / min(times["csr"]), 3)
        return out

    def build_session(self, model: nn.Module, example_inputs: tuple) -> RuntimeSession:
        import copy

        from .edits import replace_module
        from .layers.sparse import SparseLinear

        copied = copy.deepcopy(model).eval()
        found = self._candidates(copied)
        rows: dict[str, int] = {}   # input rows of each candidate at batch size 1

        def seen(name: str) -> Callable:
            def hook(mod: nn.Module, args: tuple, out: Any) -> None:
                rows.setdefault(name, args[0].numel() // mod.in_features)
            return hook

        hooks = [m.register_forward_hook(seen(name)) for name, m in found.items()]
        try:
            with torch.inference_mode():
                copied(*example_inputs)
        finally:
            for h in hooks:
                h.remove()
        layers = {}
        for name, m in found.items():
            if name not in rows:      # not called on these inputs
                continue
            speedup = self._speedups(m, rows[name])
            convert = min(speedup.values()) >= self.margin
            layers[name] = {"sparsity": round(float((m.weight == 0).float().mean()), 4), "speedup": speedup,
                            "csr": convert}
            if convert:
                replace_module(copied, name, SparseLinear.from_linear(m))
        converted = {name: v["speedup"] for name, v in layers.items() if v["csr"]}
        return SparseSession(copied, {"sparse_layers": layers}, {"sparse_speedup": converted or "none"},
                             runtime=self.name)
