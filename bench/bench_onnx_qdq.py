"""ONNX Runtime on torchslim's int8 ONNX export, with and without folding DequantizeLinear.

    python bench/bench_onnx_qdq.py

Kept for the figures it produced before the export changed: the int8 export now has no
DequantizeLinear (integer codes behind Cast/Sub/Mul, folded at load by a default session), so
the third row no longer differs from the second; bench/onnx_quantized.py measures the export as
it is.

LeNet-300-100 (random init: latency only) exported float and int8 (per-channel); the
mean of 300 runs after 20 warm-up runs, ms per batch, 2 intra-op threads, no spinning.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import torchslim
from torchslim.methods.export import export_onnx
from torchslim.methods.quantize.linear import LinearQuantConfig


def session(path: Path, extra: dict[str, str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in (extra or {}).items():
        opts.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench(sess: ort.InferenceSession, bs: int, n: int = 300) -> float:
    feed = {sess.get_inputs()[0].name: np.random.randn(bs, 1, 28, 28).astype(np.float32)}
    for _ in range(20):
        sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, feed)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    d = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    q = torchslim.apply(model, LinearQuantConfig()).eval()
    x = torch.randn(1, 1, 28, 28)
    pf, pq = export_onnx(model, (x,), d / "f.onnx"), export_onnx(q, (x,), d / "q.onnx")
    rows = [("float ONNX", pf, None), ("int8 QDQ ONNX", pq, None),
            ("int8 QDQ ONNX, session.disable_quant_qdq=1", pq, {"session.disable_quant_qdq": "1"})]
    print("| model | file bytes | bs1 ms | bs32 ms |\n|---|---|---|---|")
    for name, path, extra in rows:
        s = session(path, extra)
        print(f"| {name} | {path.stat().st_size} | {bench(s, 1):.4f} | {bench(s, 32):.4f} |")


if __name__ == "__main__":
    main()
