"""ONNX in the core: export with a dynamic batch, ONNX Runtime sessions, output checks.

An export for a task (:func:`export_for_task`) serves that task's real inputs: inputs and
output carry the task's names (``input``, ``input_ids``, ``attention_mask``; ``logits``,
``token_embeddings``), token inputs keep a dynamic sequence length, and the task's
preprocessing is recorded in the model's ``metadata_props`` under ``torchslim.preprocessing``
(JSON), next to ``torchslim.task``.

Used by the ``export`` step, the ``onnxruntime`` measurement runtime and the CLI; kept out of
the method package so that measurement does not depend on a method (and a method on
measurement) in a cycle.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .fileio import atomic_path
from .outputs import get_output, select

log = logging.getLogger(__name__)

#: ONNX exporters of ``export_onnx``: torch.onnx's dynamo exporter (with a TorchScript fallback)
#: or the TorchScript one alone
EXPORTERS = ("dynamo", "torchscript")


class TensorIO(nn.Module):
    """Tensors in, one tensor out: Hugging Face models take keyword arguments and return output
    objects, and other models may return tuples or mappings, which ONNX export and ONNX Runtime
    checks cannot use. The output is the model's prediction (:mod:`torchslim.outputs`: its
    selector, else the automatic choice); a Hugging Face model without a selector gives its first
    output (``last_hidden_state`` of an encoder, ``logits`` of a classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        selector = get_output(self.model)
        if hasattr(self.model, "config") and hasattr(self.model, "main_input_name"):  # transformers
            names = ("input_ids", "attention_mask", "token_type_ids")
            if selector is None:
                out = self.model(**dict(zip(names, inputs)), return_dict=False)
                while isinstance(out, (tuple, list)):
                    out = out[0]
                return out
            out = self.model(**dict(zip(names, inputs)))
        else:
            out = self.model(*inputs)
        return select(out, selector)


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: pip install 'torchslim[onnx]'")


def export_onnx(model: nn.Module, inputs: tuple, path: Path, opset: int = 18, *,
                input_names: tuple[str, ...] | list[str] | None = None, output_name: str = "output",
                variable_length: bool = False, metadata: dict[str, str] | None = None,
                exporter: str = "dynamo") -> Path:
    """Export to ONNX with a dynamic batch dimension; atomic (temporary file, then rename).

    ``exporter="dynamo"``: ``torch.onnx.export(dynamo=True)``; a model it cannot trace is
    exported by the TorchScript exporter, with a warning naming the reason. ``"torchscript"``:
    the deprecated TorchScript exporter only, 10-30x faster to export here (a 2-layer BERT: 2 s
    against 47 s; LeNet-5: 0.4 s against 4-12 s), for temporary files that are only timed. Quantized
    layers keep their integer codes as initializers behind Cast/Sub/Mul nodes
    (:func:`torchslim.layers.quantized.dequantize_weight`), which a default ONNX Runtime session
    folds into float weights once at load: the file is int8-sized, the outputs are PyTorch's, and
    the speed is the float model's.

    Parameters
    ----------
    inputs : tuple of tensors
        Example inputs, (batch, ...) each; the exported graph accepts any batch size.
    input_names, output_name : names of the graph's inputs (default ``input0``, ``input1``, ...)
        and output.
    variable_length : bool, default=False
        Axis 1 of every input and of the output is dynamic too (``sequence``: token inputs).
    metadata : dict of str, optional
        Written to the model's ``metadata_props``.
    exporter : {"dynamo", "torchscript"}, default="dynamo"

    Raises
    ------
    ValueError
        Input names that do not match the inputs, or an unknown ``exporter``.
    """
    _require_onnx()
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"export_onnx: exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")

    path.parent.mkdir(parents=True, exist_ok=True)
    model = TensorIO(model).eval()
    names = list(input_names) if input_names else [f"input{i}" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"export_onnx: {len(inputs)} inputs but {len(names)} input names {names}")
    axes = {0: "batch", 1: "sequence"} if variable_length else {0: "batch"}
    kwargs = dict(input_names=names, output_names=[output_name], opset_version=opset)
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no export for
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            proto = _export_proto(model, inputs, axes, kwargs, exporter)
        _fold_weight_transposes(proto)
        _cast_like_to_cast(proto)
        if opset >= 21:
            _pack_int4(proto)
        if metadata:
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def _export_proto(model: nn.Module, inputs: tuple, axes: dict[int, str], kwargs: dict[str, Any],
                  exporter: str):
    """The ONNX ModelProto by ``exporter``; the dynamo exporter falls back to TorchScript.
    Layers with integer kernels export their float computation on the weight codes
    (:func:`~torchslim.layers.quantized.float_compute`)."""
    from .layers.quantized import float_compute

    with float_compute():
        return _export_proto_float(model, inputs, axes, kwargs, exporter)


def _export_proto_float(model: nn.Module, inputs: tuple, axes: dict[int, str], kwargs: dict[str, Any],
                        exporter: str):
    if exporter == "dynamo":
        try:
            return _export_dynamo(model, inputs, axes, kwargs)
        except Exception as exc:  # noqa: BLE001  (any tracing failure: the older exporter may cope)
            root = exc.__cause__ or exc  # the exporter wraps torch.export's own error
            reason = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
            log.warning("ONNX export: the dynamo exporter failed (%s); using the TorchScript exporter", reason)
    dynamic_axes = {n: axes for n in [*kwargs["input_names"], *kwargs["output_names"]]}
    return _export_torchscript(model, inputs, dict(kwargs, dynamic_axes=dynamic_axes))


def _export_dynamo(model: nn.Module, inputs: tuple, axes: dict[int, str], kwargs: dict[str, Any]):
    """The ONNX ModelProto of ``torch.onnx.export(dynamo=True)``, ``axes`` (index -> name) of
    every input dynamic."""
    import warnings

    _cache_torchlib()
    # torch.export takes a size-1 dimension for a constant: trace a batch of two
    inputs = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
    dims = {i: torch.export.Dim(name) for i, name in axes.items()}
    # TensorIO.forward(*inputs): one varargs parameter holding every input
    kwargs = dict(kwargs, dynamic_shapes=(tuple(dims for _ in inputs),))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")
        # optimize=False: the onnxscript optimizer folds small integer weights into float
        # initializers (ONNX Runtime folds them at load anyway, after the file is written)
        program = torch.onnx.export(
            model, inputs, dynamo=True, verbose=False, optimize=False,
            custom_translation_table={torch.ops.torchslim.dequantize_weight.default: _dequantize_weight_onnx},
            **kwargs)
    proto = program.model_proto
    for node in proto.graph.node:  # each node's Python stack trace, with this machine's paths
        del node.metadata_props[:]
    return proto


def _export_torchscript(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]):
    """The ONNX ModelProto of the TorchScript exporter; constants are not folded at export, so
    integer codes stay integer in the file (ONNX Runtime folds them at load)."""
    import tempfile
    import warnings

    import onnx

    torch.onnx.register_custom_op_symbolic("torchslim::dequantize_weight", _dequantize_weight_symbolic,
                                           kwargs["opset_version"])
    with tempfile.TemporaryDirectory(prefix="torchslim-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, f"{tmp}/m.onnx", dynamo=False, do_constant_folding=False, **kwargs)
        return onnx.load(f"{tmp}/m.onnx")


def _fold_weight_transposes(proto) -> int:
    """Replace every Transpose of a float initializer (a Linear's weight on inputs of rank 3 or
    more is exported as ``MatMul(x, Transpose(W))`` now that constants are not folded) by the
    transposed initializer, in place; returns how many. ONNX Runtime folds these at load anyway,
    but tools that read the file, such as ``onnxruntime.quantization.quantize_dynamic``, quantize
    a MatMul only when its weight is an initializer. Integer codes are never read by a Transpose
    directly (Cast comes first), so they stay integer."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    readers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    folded, keep = 0, []
    for node in proto.graph.node:
        src = inits.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if src is None or src.data_type not in floats or readers.get(src.name) != 1:
            keep.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        arr = numpy_helper.to_array(src)
        out = numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), node.output[0])
        proto.graph.initializer.remove(src)
        proto.graph.initializer.append(out)
        folded += 1
    if folded:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return folded


def _cast_like_to_cast(proto) -> int:
    """Replace every ``CastLike(x, like)`` whose ``like`` has a known element type by ``Cast(x,
    to=type)``, in place; returns how many. The dynamo exporter (unoptimized) gives a bias-less
    conv a zero bias ``Expand(CastLike(0, input), Shape(W))``: read from the graph input, ONNX
    Runtime cannot fold it, so the bias is not a constant and Conv + BatchNormalization are not
    fused, nor the convs laid out for its blocked kernels. A Cast of a constant is folded at load:
    ``zoo:resnet-fmnist`` at batch 16 ran in 25 ms, 10 ms after this (BENCHMARKS.md,
    structured pruning on Fashion-MNIST)."""
    from onnx import TensorProto, helper

    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    done = 0
    for node in g.node:
        to = types.get(node.input[1], TensorProto.UNDEFINED) if node.op_type == "CastLike" else 0
        if to != TensorProto.UNDEFINED and not node.domain:
            node.op_type = "Cast"
            del node.input[1:]          # CastLike's one attribute (saturate, opset 19) is Cast's too
            node.attribute.append(helper.make_attribute("to", to))
            done += 1
    return done


def _pack_int4(proto) -> int:
    """Store every int8 initializer whose values fit in [-8, 7] and that only Cast and Shape
    nodes read (both take INT4 at opset 21) as INT4 (opset 21: two codes per byte), in place; returns how many. The codes of 4-, 3- and
    2-bit layers so take half the bytes of int8, and ONNX Runtime still folds them at load."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    packed = 0
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.INT8 or not readers.get(init.name, {"?"}) <= {"Cast", "Shape"}:
            continue
        a = numpy_helper.to_array(init).reshape(-1).astype(np.int16)
        if a.size == 0 or a.min() < -8 or a.max() > 7:
            continue
        if a.size % 2:
            a = np.append(a, 0)
        nibbles = (a & 0xF).astype(np.uint8)                         # two's complement, 4 bits
        init.raw_data = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # first element in the low nibble
        init.data_type = TensorProto.INT4
        del init.int32_data[:]
        packed += 1
    return packed


def _cache_torchlib() -> None:
    """Keep the exporter's table of ATen translations between exports: it is rebuilt from the
    source of about 500 onnxscript functions on every ``torch.onnx.export`` call (5 s here),
    longer than the export of a small model itself."""
    try:
        from torch.onnx._internal.exporter import _registration

        apis = _registration.onnxscript_apis
        if not hasattr(apis.get_torchlib_ops, "cache_info"):
            apis.get_torchlib_ops = functools.cache(apis.get_torchlib_ops)
    except (ImportError, AttributeError):  # another torch layout: exports are slower, not wrong
        pass


def _dequantize_weight_onnx(q, scale, zero=None):
    """ONNX translation of ``torchslim::dequantize_weight``: ``(q - zero) * scale`` with ``q``
    read as ``(R, G, -1)`` for ``scale`` of shape ``(R, G)``, back to ``q``'s shape. Every input
    is an initializer, so ONNX Runtime's constant folding computes it once per session."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    last = op.Constant(value_ints=[-1])
    g = op.Reshape(op.Cast(q, to=TensorProto.FLOAT), op.Concat(op.Shape(scale), last, axis=0))   # (R, G, k)
    if zero is not None:
        g = op.Sub(g, op.Unsqueeze(op.Cast(zero, to=TensorProto.FLOAT), last))
    return op.Reshape(op.Mul(g, op.Unsqueeze(scale, last)), op.Shape(q))


def _dequantize_weight_symbolic(g, q, scale, zero):
    """The same for the TorchScript exporter."""
    from torch.onnx import symbolic_helper

    last = g.op("Constant", value_t=torch.tensor([-1]))
    w = g.op("Reshape", g.op("Cast", q, to_i=1), g.op("Concat", g.op("Shape", scale), last, axis_i=0))
    if not symbolic_helper._is_none(zero):
        w = g.op("Sub", w, g.op("Unsqueeze", g.op("Cast", zero, to_i=1), last))
    return g.op("Reshape", g.op("Mul", w, g.op("Unsqueeze", scale, last)), g.op("Shape", q))


def export_for_task(model: nn.Module, task: Any, path: Path, opset: int = 18, exporter: str = "dynamo") -> Path:
    """Export ``model`` to serve ``task``'s inputs: the task's input and output names (a task
    whose input count differs from its names gets ``input0``, ...), a dynamic sequence length
    for token inputs, and the task's preprocessing in ``metadata_props``
    (``torchslim.preprocessing``: JSON, ``null`` when the task records none). A task that
    tokenizes text (a ``tokenizer`` with ``save_pretrained``) gets its tokenizer saved beside the
    file (``tokenizer/``, named in ``torchslim.tokenizer``), so the export serves raw text offline."""
    inputs = task.example_inputs(1)
    names = tuple(task.input_names)
    metadata = {"torchslim.task": task.spec, "torchslim.preprocessing": json.dumps(task.preprocessing)}
    tokenizer = getattr(task, "tokenizer", None)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(Path(path).parent / "tokenizer"))
        metadata["torchslim.tokenizer"] = "tokenizer"  # relative to the ONNX file's folder
    return export_onnx(model, inputs, path, opset, input_names=names if len(names) == len(inputs) else None,
                       output_name=task.output_name, variable_length=task.variable_length, metadata=metadata,
                       exporter=exporter)


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # no busy-waiting worker threads: they would steal the cores from later PyTorch timings
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: Path, inputs: tuple, atol: float, rtol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime (a session with default options) and PyTorch
    outputs; raises RuntimeError above ``atol + rtol * max|output|`` (float32 kernels differ by
    rounding, more so on large outputs) and NumericalError when either output holds NaN or inf (a
    NaN difference never passes)."""
    return onnx_agreement(model, path, inputs, atol, rtol)[0]


def onnx_agreement(model: nn.Module, path: Path, inputs: tuple, atol: float,
                   rtol: float = 1e-4) -> tuple[float, float]:
    """``(max abs difference, min cosine)`` of ONNX Runtime's and PyTorch's outputs, the cosine
    per example (each output row flattened); checked as :func:`check_onnx` says. PyTorch's
    outputs all within ``atol`` of zero (a model scaled to nothing) let any file with outputs as
    small pass the bound: a warning says so, with the cosine."""
    sess = onnx_session(path)
    feed = {i.name: t.cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    from .layers.quantized import float_compute
    with torch.no_grad(), float_compute():   # what the file computes: integer-kernel layers on their float weights
        want = TensorIO(model).eval()(*inputs).cpu()
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        from .numerics import NumericalError

        raise NumericalError(f"ONNX check: non-finite outputs (ONNX Runtime: {int((~torch.isfinite(got)).sum())}, "
                             f"PyTorch: {int((~torch.isfinite(want)).sum())} values); the model is not shipped")
    diff = float((got - want).abs().max())
    bound = atol + rtol * float(want.abs().max())
    if not diff <= bound:  # NaN-safe: a NaN difference fails
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} "
                           f"(> {bound:.3g} = atol {atol} + rtol {rtol} * max|output|)")
    scale = float(want.abs().max())
    # each row scaled to max 1 first: cosine_similarity clamps norms below 1e-8, which hid the angle
    # of tiny outputs; two all-zero rows agree (cosine 1)
    g, w = got.double().flatten(1), want.double().flatten(1)
    unit = torch.maximum(g.abs().amax(1, keepdim=True), w.abs().amax(1, keepdim=True))
    cos = torch.nn.functional.cosine_similarity(g / unit.clamp_min(1e-300), w / unit.clamp_min(1e-300), dim=1)
    cos = torch.where(unit.squeeze(1) == 0, torch.ones_like(cos), cos)
    if scale <= atol:  # every output within atol of zero: a file whose outputs are near zero too passes
        log.warning("ONNX check: PyTorch's outputs are all within atol %g of zero (max |output| %.3g), so the "
                    "difference bound passes any file whose outputs are as small, whatever their direction; "
                    "cosine of the outputs %.4f", atol, scale, float(cos.min()))
    return diff, float(cos.min())
