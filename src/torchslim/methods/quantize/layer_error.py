"""Per-layer quantization error of a quantize step: the metrics row's ``quantized_layers``.

Every quantize method keeps a :class:`FloatReference` of the model just before it replaces
layers (after SmoothQuant's exact re-scaling and QAT's training, before any fine-tuning of the
codes) and calls :meth:`FloatReference.record` once they are replaced. For each layer the step
quantized, the row gets its scheme, bits and two errors:

- ``sqnr_db``: the SQNR of the layer's *output*, ``10 log10(sum y^2 / sum (y - y_q)^2)``, with
  ``y`` the float layer's output and ``y_q`` the quantized layer's output on the same input:
  the input the *float* model gives that layer (one forward of the float copy with hooks, each
  quantized layer applied to what its float twin received). The error is the layer's own, not
  accumulated through the layers before it. Int8 activations are part of ``y_q``.
- ``weight_sqnr_db``: the same ratio between the float weight and the dequantized one.

Inputs: at most :data:`EXAMPLES` calibration examples of the task's train split (the first
examples of the method's own calibration draw: seed 0), padding positions of token tasks left
out; a ``shape:`` task (no data) uses its example inputs, and the row says so
(``quantized_layers_input``). Without a task only the weight SQNR is given.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...layers.codebook import _CodedWeight
from ...layers.int8 import Int8Conv2d, Int8Linear
from ...layers.quantized import _QuantWeights
from ...modules import eval_mode
from ...specs.tasks import to_device
from . import primitives as P
from .calibration import token_rows

log = logging.getLogger(__name__)

#: calibration examples the output error is measured on, at most, in batches of at most
#: ``BATCH_SIZE``: the cost is one forward pass of the float model over them plus one call of each
#: quantized layer (MiniLM, 32 STS-B pairs: about 3,000 tokens, 4 s at one thread); a layer's SQNR
#: sums over every element of its output, so a few thousand rows settle it
EXAMPLES = 32
BATCH_SIZE = 16
#: examples drawn from a ``shape:`` task's example inputs (random; it has no data)
EXAMPLE_BATCH = 8
#: the layer classes whose weights are codes (quantized by some step)
QUANTIZED = (_QuantWeights, _CodedWeight)
#: ``_CodedWeight.storage`` of the ``float`` scheme -> its short name
_FLOAT_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8 e4m3", "float8_e5m2": "fp8 e5m2"}


def scheme(layer: nn.Module) -> str:
    """A short standard description of how ``layer`` (a quantized layer of
    :mod:`torchslim.layers`) stores and computes its weight: ``int4 symmetric per-group g128``,
    ``int8 affine per-channel``, ``int8 w8a7 dynamic (symmetric per-channel weights)``,
    ``kmeans 5-bit codebook``, ``binary sign x mean|w| per-channel``, ``fp8 e4m3 per-channel
    scale``, ``bf16``.

    Examples
    --------
    >>> from torchslim.layers import QuantLinear
    >>> scheme(QuantLinear(256, 8, bits=4, granularity="group", group_size=128))
    'int4 symmetric per-group g128'
    """
    if isinstance(layer, _QuantWeights):
        weights = f"{'symmetric' if layer.symmetric else 'affine'} per-{layer.granularity}"
        if layer.granularity == "group":
            weights += f" g{layer.group_size}"
        if not isinstance(layer, (Int8Linear, Int8Conv2d)):
            return f"int{layer.bits} {weights}"
        if layer.kernel == "dequant":   # kernel: auto measured float compute faster for this layer
            return f"int{layer.bits} {weights} weights, float activations (dequant kernel)"
        return f"int{layer.bits} w{layer.bits}a{layer.act_bits} {layer.activations} ({weights} weights)"
    if not isinstance(layer, _CodedWeight):
        raise TypeError(f"scheme: {type(layer).__name__} is not a quantized layer")
    if layer.scheme == "kmeans":
        return f"kmeans {layer.bits}-bit codebook" + (" (index 0: exact zero)" if layer.zero_code else "")
    if layer.scheme == "log":
        return f"log {layer.bits}-bit (sign + power of two) per-channel scale"
    if layer.scheme == "binary":
        return "binary sign x mean|w| per-channel"
    if layer.scheme == "ternary":
        return "ternary {-a, 0, a} per-channel (TWN)"
    name = _FLOAT_NAMES.get(layer.storage, str(layer.storage))
    return f"{name} per-channel scale" if layer.scale is not None else name


def _weight_pairs(float_layer: nn.Module, q: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(float weight, dequantized weight) for each weight ``q`` holds as codes."""
    if isinstance(q, _QuantWeights):
        return [(getattr(float_layer, n), q.dequantized_weight(n)) for n in q._qweights]
    return [(float_layer.weight, q.dequantized_weight())]


def _compared(task: Any, batch: Any, y: torch.Tensor) -> torch.Tensor:
    """The part of output ``y`` (``(..., features)``) the error is summed over: all of it, except
    the padding positions of a token task, as calibration leaves them out
    (:func:`~torchslim.methods.quantize.calibration.token_rows`: an ``attention_mask`` input with
    one element per row of ``y``)."""
    return token_rows(task, batch, y) if batch is not None and y.dim() >= 2 else y


def _first_tensor(out: Any) -> torch.Tensor | None:
    """A layer's output tensor (``nn.MultiheadAttention`` returns ``(output, weights)``)."""
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out if isinstance(out, torch.Tensor) else None


def _db(value: float) -> float | None:
    """dB for JSON: 3 decimals; None when infinite or undefined (the entry's ``note`` says why)."""
    return round(value, 3) if math.isfinite(value) else None


class FloatReference:
    """The float model as it is before a quantize method replaces its layers, kept to measure
    each replaced layer's error afterwards (:meth:`record`).

    Parameters
    ----------
    model : nn.Module
        The model about to be quantized (deep-copied: about one more copy of its weights is held
        until :meth:`record` returns).
    session : Session or None
        The step's session (task, device, calibration batches, the row's ``info``); None: nothing
        is measured or recorded.
    calibration : CalibrationConfig, optional
        The method's ``calibration:`` block: the first ``EXAMPLES`` of its ``samples`` are used,
        in batches of at most its ``batch_size`` and ``BATCH_SIZE``.

    Examples
    --------
    >>> import torchslim
    >>> from torchslim.session import Session
    >>> from torchslim.layers import QuantLinear
    >>> from torchslim.edits import replace_module
    >>> m, s = torchslim.build_model("zoo:lenet-300-100"), Session()
    >>> ref = FloatReference(m, s)
    >>> replace_module(m, "1", QuantLinear.from_float(m[1], bits=4))
    >>> row = ref.record(m)[0]
    >>> row["name"], row["scheme"], row["sqnr_db"] is None, 15 < row["weight_sqnr_db"] < 30
    ('1', 'int4 symmetric per-channel', True, True)
    """

    def __init__(self, model: nn.Module, session: Any, calibration: Any = None) -> None:
        self.session, self.calibration = session, calibration
        self.float_model = copy.deepcopy(model) if session is not None else None

    def _inputs(self) -> tuple[list[tuple[Any, tuple | None]], str]:
        """What the float model runs on, as ``(batch, None)`` pairs for ``task.forward`` or one
        ``(None, inputs)`` pair for ``model(*inputs)`` (a shape task), and the row's description
        of it."""
        task = self.session.task
        if task is None:
            return [], "none (no task): weight SQNR only"
        try:
            available = len(task.split("train"))
        except UserError:   # a shape: task: random example inputs only
            inputs = to_device(task.example_inputs(EXAMPLE_BATCH), self.session.device)
            return [(None, tuple(inputs))], (f"the task's example inputs ({EXAMPLE_BATCH} random examples: "
                                             f"{task.spec} has no data)")
        cal = self.calibration
        batch_size = min(cal.batch_size, BATCH_SIZE) if cal is not None else BATCH_SIZE
        samples = min(cal.samples if cal is not None else EXAMPLES, EXAMPLES, available)
        batches = self.session.calibration_batches(samples, batch_size=batch_size)
        return [(b, None) for b in batches], (f"{samples} calibration examples of the train split "
                                              f"({len(batches)} batch(es) of at most {batch_size})")

    def _output_energy(self, model: nn.Module, layers: dict[str, nn.Module],
                       runs: list[tuple[Any, tuple | None]]) -> dict[str, list]:
        """``name -> [signal, noise, calls]`` summed over ``runs`` of the float copy: a hook on
        each float layer applies its quantized twin (``layers[name]``) to the same arguments."""
        reference = dict(self.float_model.named_modules())
        energy = {n: [0.0, 0.0, 0] for n in layers}
        task = self.session.task
        current: list[Any] = [None]                  # the batch being run (its padding positions)

        def hook(name: str):
            def fn(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                y, y_q = _first_tensor(out), _first_tensor(layers[name](*args, **kwargs))
                if y is None or y_q is None:
                    return
                signal, noise = P.error_energy(_compared(task, current[0], y), _compared(task, current[0], y_q))
                e = energy[name]
                e[0], e[1], e[2] = e[0] + signal, e[1] + noise, e[2] + 1
            return fn

        handles = [reference[n].register_forward_hook(hook(n), with_kwargs=True) for n in layers]
        try:
            with torch.no_grad(), eval_mode(self.float_model), eval_mode(model):
                for batch, inputs in runs:
                    current[0] = batch
                    if inputs is not None:
                        self.float_model(*inputs)
                    else:
                        task.forward(self.float_model, batch)
        finally:
            for h in handles:
                h.remove()
        return energy

    def record(self, model: nn.Module, when: str | None = None) -> list[dict[str, Any]]:
        """Measure every layer of ``model`` that is quantized now and was float in the reference,
        put the list in the step's row (``session.info["metrics"]["quantized_layers"]``, with
        ``quantized_layers_input`` saying what the outputs were measured on) and return it.

        Each entry: ``name``, ``type`` (the quantized class), ``scheme`` (:func:`scheme`),
        ``bits`` (of the weight codes), ``group_size`` (null unless per-group), ``sqnr_db``
        (output SQNR, dB), ``weight_sqnr_db`` (dB), and ``note`` where a figure is null: the
        layer was never called on the inputs (``nn.MultiheadAttention`` reads its ``out_proj``'s
        weight), its output was not finite, or there is no error to measure (exact). ``when``
        (e.g. "before fine-tuning") is added to ``quantized_layers_input``.
        """
        if self.float_model is None:
            return []
        reference = dict(self.float_model.named_modules())
        layers = {n: m for n, m in model.named_modules()
                  if isinstance(m, QUANTIZED) and n in reference and not isinstance(reference[n], QUANTIZED)}
        runs, described = self._inputs() if layers else ([], "")
        energy = self._output_energy(model, layers, runs)
        with torch.no_grad():
            rows = [_entry(name, q, reference[name], *energy[name], measured=bool(runs)) for name, q in layers.items()]
        self.float_model = None                      # the copy is not needed any more
        metrics = self.session.info.setdefault("metrics", {})
        metrics["quantized_layers"] = rows
        metrics["quantized_layers_input"] = (f"{described}, {when}" if when and described else described) or None
        measured = [r for r in rows if r["sqnr_db"] is not None]
        if measured:
            worst = min(measured, key=lambda r: r["sqnr_db"])
            log.info("quantize: output SQNR of %d layer(s) on %s: median %.1f dB, lowest %.1f dB (%s)",
                     len(measured), described, statistics.median(r["sqnr_db"] for r in measured),
                     worst["sqnr_db"], worst["name"])
        return rows


def _entry(name: str, q: nn.Module, float_layer: nn.Module, signal: float, noise: float, calls: int,
           measured: bool) -> dict[str, Any]:
    """One ``quantized_layers`` entry (see :meth:`FloatReference.record`) from the output
    energies summed over ``calls`` calls of the layer; ``measured``: inputs were run at all."""
    w_signal = w_noise = 0.0
    for w, deq in _weight_pairs(float_layer, q):
        s, n = P.error_energy(w, deq)
        w_signal, w_noise = w_signal + s, w_noise + n
    out_db, w_db = (P.sqnr_db(signal, noise) if calls else math.nan), P.sqnr_db(w_signal, w_noise)
    notes = []
    if measured and not calls:
        notes.append("not called as a module on the inputs (an out_proj whose weight nn.MultiheadAttention "
                     "reads): weight SQNR only")
    if out_db == math.inf:
        notes.append("output exact (no error)")
    elif calls and not (math.isfinite(signal) and math.isfinite(noise)):
        notes.append("output not finite")
    if w_db == math.inf:
        notes.append("weight exact (no error)")
    return {"name": name, "type": type(q).__name__, "scheme": scheme(q), "bits": int(q.bits),
            "group_size": q.group_size if getattr(q, "granularity", None) == "group" else None,
            "sqnr_db": _db(out_db), "weight_sqnr_db": _db(w_db), **({"note": "; ".join(notes)} if notes else {})}
