"""Pruning criteria side by side on a trained digits-cnn: one-shot, no fine-tuning.

Trains zoo:digits-cnn on digits (adamw, 8 epochs, lr 0.003, seed 0: the test suite's model),
then prunes single weights (granularity weight, scope global) with magnitude, taylor and
random at several sparsities, and threshold at several alphas (its sparsity is the result),
and prints test accuracy and the time each pruning took (taylor: gradients on 128 examples).

    python bench/bench_criteria.py
"""

from __future__ import annotations

import time

import torch

import torchslim
from torchslim.prune import MagnitudePruneConfig, RandomPruneConfig, TaylorPruneConfig, ThresholdPruneConfig
from torchslim.train import TrainConfig, train


def sparsity(model: torch.nn.Module) -> float:
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main() -> None:
    torch.set_num_threads(1)
    task = torchslim.build_task("digits")
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")
    train(model, task, TrainConfig(optimizer="adamw", epochs=8, lr=0.003, loggers=()))
    print(f"baseline accuracy {task.evaluate(model):.4f}")
    print("| criterion | setting | sparsity | accuracy | pruning s |")
    print("|---|---|---|---|---|")
    runs = [(name, f"sparsity {s}", cfg(s)) for s in (0.5, 0.7, 0.8, 0.9, 0.95)
            for name, cfg in (("magnitude", lambda s: MagnitudePruneConfig(sparsity=s)),
                              ("taylor", lambda s: TaylorPruneConfig(sparsity=s, samples=128)),
                              ("random", lambda s: RandomPruneConfig(sparsity=s)))]
    runs += [("threshold", f"alpha {a}", ThresholdPruneConfig(alpha=a)) for a in (0.05, 0.1, 0.2, 0.3)]
    for name, setting, cfg in runs:
        t0 = time.perf_counter()
        pruned = torchslim.apply(model, cfg, task=task)
        took = time.perf_counter() - t0
        print(f"| {name} | {setting} | {sparsity(pruned):.4f} | {task.evaluate(pruned):.4f} | {took:.2f} |")


if __name__ == "__main__":
    main()
