"""Quantized ONNX export in a default ONNX Runtime session: fidelity, speed and size.

    OMP_NUM_THREADS=1 TORCHSLIM_DATA=/path/to/data python bench/onnx_quantized.py

For each model, the float export and the int8 export (``quantize.linear``, per-channel
symmetric) are opened in ONNX Runtime sessions with default options (CPU provider, 1 intra-op
thread, no spinning) and timed in turns (median over 5 rounds of the best of 3 x 5 calls, ms
per batch). Fidelity is the int8 ONNX output against the int8 PyTorch model: max abs difference
and cosine (MiniLM: of mean-pooled sentence embeddings of real STS-B test sentences, batch 32;
CNNs: of logits on random inputs). all-MiniLM-L6-v2 with its weights (hf:minilm); LeNet-5 and
ResNet-18 (64x64 inputs) random-init (latency only).
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import timeit
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import torchslim
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.onnx_io import TensorIO, export_for_task, export_onnx, onnx_session


def timed(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int = 5) -> dict[str, float]:
    per = collections.defaultdict(list)
    for _ in range(rounds):
        for name, s in sessions.items():
            per[name].append(min(timeit.repeat(lambda: s.run(None, feed), number=5, repeat=3)) / 5 * 1e3)
    return {k: statistics.median(v) for k, v in per.items()}


def sentences(task, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = task.split("test")
    seqs = [test[i][0] for i in range(n)]
    ids = torch.zeros(n, max(len(s) for s in seqs), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
    return ids, mask


def row(name: str, f_path: Path, q_path: Path, q_model: torch.nn.Module, check: tuple, feeds: dict, pool) -> None:
    sessions = {"float": onnx_session(f_path), "int8": onnx_session(q_path)}
    names = [i.name for i in sessions["int8"].get_inputs()]
    got = torch.from_numpy(sessions["int8"].run(None, {n: t.numpy() for n, t in zip(names, check)})[0])
    with torch.no_grad():
        want = TensorIO(q_model).eval()(*check)
    cos = torch.nn.functional.cosine_similarity(pool(got), pool(want), dim=-1)
    lat = {bs: timed(sessions, {n: t.numpy() for n, t in zip(names, x)}) for bs, x in feeds.items()}
    ratios = " | ".join(f"{lat[bs]['float']:.3f} / {lat[bs]['int8']:.3f} ({lat[bs]['int8'] / lat[bs]['float']:.2f})"
                        for bs in feeds)
    print(f"| {name} | {f_path.stat().st_size / 2**20:.2f} / {q_path.stat().st_size / 2**20:.2f} | "
          f"{float((got - want).abs().max()):.2e} | {float(cos.mean()):.6f} / {float(cos.min()):.6f} | {ratios} |")


def main() -> None:
    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp())
    print("| model | MiB float / int8 | max abs diff | cosine mean / min | bs1 ms float / int8 (ratio) | "
          "bs16-32 ms float / int8 (ratio) |\n|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for spec, shape in (("zoo:lenet-5", (1, 28, 28)), ("torchvision:resnet18", (3, 64, 64))):
        model = torchslim.build_model(spec).eval()
        q = torchslim.apply(model, LinearQuantConfig(bits=8)).eval()
        x1 = torch.randn(1, *shape)
        f_path, q_path = export_onnx(model, (x1,), d / "f.onnx"), export_onnx(q, (x1,), d / "q.onnx")
        row(spec, f_path, q_path, q, (torch.randn(16, *shape),), {1: (x1,), 16: (torch.randn(16, *shape),)},
            pool=lambda y: y)
    task = torchslim.build_task("stsb")
    model = torchslim.build_model("hf:minilm").eval()
    q = torchslim.apply(model, LinearQuantConfig(bits=8)).eval()
    f_path, q_path = export_for_task(model, task, d / "mf.onnx"), export_for_task(q, task, d / "mq.onnx")
    ids, mask = sentences(task, 32)
    m = mask[..., None].float()
    row("hf:minilm (STS-B test sentences)", f_path, q_path, q, (ids, mask),
        {1: (ids[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())]), 32: (ids, mask)},
        pool=lambda h: (h * m).sum(1) / m.sum(1))


if __name__ == "__main__":
    main()
