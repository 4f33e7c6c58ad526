"""ONNX in the core: export with a dynamic batch, ONNX Runtime sessions, output checks.

Used by the ``export`` step, the ``onnxruntime`` measurement runtime and the CLI; kept out of
the method package so that measurement does not depend on a method (and a method on
measurement) in a cycle.
"""

from __future__ import annotations

from pathlib import Path

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


def export_onnx(model: nn.Module, inputs: tuple, path: Path, opset: int = 18) -> Path:
    """Export to ONNX with a dynamic batch dimension; atomic (temporary file, then rename)."""
    _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = TensorIO(model).eval()
    names = [f"input{i}" for i in range(len(inputs))]
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no export for
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), atomic_path(path) as tmp:
            torch.onnx.export(model, inputs, str(tmp), input_names=names, output_names=["output"],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
                              opset_version=opset, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


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
    """Max abs difference between ONNX Runtime and PyTorch outputs; raises above
    ``atol + rtol * max|output|`` (float32 kernels differ by rounding, more so on large outputs)."""
    sess = onnx_session(path)
    feed = {i.name: t.cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        want = TensorIO(model).eval()(*inputs)
    diff = float((got - want.cpu()).abs().max())
    bound = atol + rtol * float(want.abs().max())
    if diff > bound:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} "
                           f"(> {bound:.3g} = atol {atol} + rtol {rtol} * max|output|)")
    return diff
