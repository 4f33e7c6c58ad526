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
