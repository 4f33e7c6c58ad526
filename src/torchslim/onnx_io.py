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

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .fileio import atomic_path
from .outputs import get_output, select


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
                variable_length: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Export to ONNX with a dynamic batch dimension; atomic (temporary file, then rename).

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
    """
    _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = TensorIO(model).eval()
    names = list(input_names) if input_names else [f"input{i}" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"export_onnx: {len(inputs)} inputs but {len(names)} input names {names}")
    axes = {0: "batch", 1: "sequence"} if variable_length else {0: "batch"}
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no export for
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), atomic_path(path) as tmp:
            torch.onnx.export(model, inputs, str(tmp), input_names=names, output_names=[output_name],
                              dynamic_axes={n: axes for n in [*names, output_name]},
                              opset_version=opset, dynamo=False)
            if metadata:
                import onnx

                proto = onnx.load(str(tmp))
                onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
                onnx.save(proto, str(tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def export_for_task(model: nn.Module, task: Any, path: Path, opset: int = 18) -> Path:
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
                       output_name=task.output_name, variable_length=task.variable_length, metadata=metadata)


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # no busy-waiting worker threads: they would steal the cores from later PyTorch timings
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # int8 weight-only layers are DequantizeLinear on initializers: let ORT fold them into float
    # weights once at load instead of dequantizing on every run (the file stays int8)
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: Path, inputs: tuple, atol: float, rtol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime and PyTorch outputs; raises RuntimeError above
    ``atol + rtol * max|output|`` (float32 kernels differ by rounding, more so on large outputs)
    and NumericalError when either output holds NaN or inf (a NaN difference never passes)."""
    sess = onnx_session(path)
    feed = {i.name: t.cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        want = TensorIO(model).eval()(*inputs)
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        from .numerics import NumericalError

        raise NumericalError(f"ONNX check: non-finite outputs (ONNX Runtime: {int((~torch.isfinite(got)).sum())}, "
                             f"PyTorch: {int((~torch.isfinite(want)).sum())} values); the model is not shipped")
    diff = float((got - want.cpu()).abs().max())
    bound = atol + rtol * float(want.abs().max())
    if not diff <= bound:  # NaN-safe: a NaN difference fails
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} "
                           f"(> {bound:.3g} = atol {atol} + rtol {rtol} * max|output|)")
    return diff
