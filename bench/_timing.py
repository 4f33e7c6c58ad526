"""Latency of several models timed in turns (shared by the bench scripts run from this folder)."""

from __future__ import annotations

import statistics

import torch
import torch.utils.benchmark as benchmark


def latency(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each model's median ms per forward on ``x``, the models timed in
    turns (``torch.utils.benchmark`` ``blocked_autorange``, 0.3 s each, ``inference_mode``)."""
    per: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            t = benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=torch.get_num_threads())
            with torch.inference_mode():
                per[name].append(t.blocked_autorange(min_run_time=0.3).median * 1e3)
    return {k: statistics.median(v) for k, v in per.items()}


class OrtSession(torch.nn.Module):
    """An ONNX Runtime CPU session behind ``model(x) -> tensor`` (one input, first output), so it
    is timed by :func:`latency` beside PyTorch models: ``threads`` intra-op threads, one inter-op
    thread, no spinning workers (they would steal the core from the models timed in turn)."""

    def __init__(self, path, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.input: x.numpy()})[0])
