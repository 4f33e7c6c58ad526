"""Head and layer criteria side by side on all-MiniLM-L6-v2 (STS-B): one-shot, no fine-tuning.

Removes 25% of the 72 attention heads (scope global) with magnitude, taylor, activation (mean
|x| of each head's slice of the attention output; and 1 - APoZ), entropy and random (3 seeds), and drops
1 of the 6 layers with magnitude, taylor and activation (mean |output - input|); prints the
heads kept per layer (or the layer dropped), the Spearman correlation on the test split and
the time each pruning took (data criteria: statistics on 128 training pairs); then each layer
dropped alone, the reference the layer criteria are judged by (``--alone``: those rows only;
``--measures``: per-layer update sizes and ShortGPT's Block Influence, no pruning).

    TORCHSLIM_DATA=../shared/data python bench/heads_criteria.py [--alone | --measures]
"""

from __future__ import annotations

import sys
import time

import torch

import torchslim
from torchslim.prune import (ActivationPruneConfig, EntropyPruneConfig, MagnitudePruneConfig, RandomPruneConfig,
                             TaylorPruneConfig)


def layer_measures(model: torch.nn.Module, task) -> None:
    """Per layer, on the 128 calibration pairs: mean |output - input|, that over mean |input|, and
    ShortGPT's Block Influence 1 - cos(input, output) (Men et al. 2024, eq. 2), token-averaged."""
    from torchslim.session import Session
    seen: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(model.encoder.layer))}

    def hook(i: int):
        def fn(m, args, kwargs, y):
            x = args[0] if args else kwargs["hidden_states"]
            y = y[0] if isinstance(y, tuple) else y
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
            seen[i].append(((y - x).abs().mean().item(), x.abs().mean().item(), 1 - cos.item()))
        return fn

    handles = [lay.register_forward_hook(hook(i), with_kwargs=True) for i, lay in enumerate(model.encoder.layer)]
    with torch.no_grad():
        for batch in Session(task=task).calibration_batches(128):
            task.forward(model, batch)
    for h in handles:
        h.remove()
    print("| layer | mean \\|out - in\\| | mean \\|in\\| | ratio | 1 - cos |")
    print("|---|---|---|---|---|")
    for i, rows in seen.items():
        d, x, bi = torch.tensor(rows).mean(0).tolist()
        print(f"| {i} | {d:.4f} | {x:.4f} | {d / x:.4f} | {bi:.4f} |")


def main() -> None:
    torch.set_num_threads(1)
    task = torchslim.build_task("stsb")
    model = torchslim.build_model("hf:minilm").eval()
    if "--measures" in sys.argv:
        layer_measures(model, task)
        return
    print(f"baseline Spearman {task.evaluate(model):.4f}")
    heads = dict(granularity="head", sparsity=0.25, samples=128)
    layer = dict(granularity="layer", sparsity=1 / 6, samples=128)
    runs = [("magnitude", "heads 25%", MagnitudePruneConfig(**heads)),
            ("taylor", "heads 25%", TaylorPruneConfig(**heads)),
            ("activation mean", "heads 25%", ActivationPruneConfig(**heads)),
            ("activation apoz", "heads 25%", ActivationPruneConfig(**heads, statistic="apoz")),
            ("entropy", "heads 25%", EntropyPruneConfig(**heads)),
            *((f"random (seed {k})", "heads 25%", RandomPruneConfig(**heads, seed=k)) for k in range(3)),
            ("magnitude", "1 of 6 layers", MagnitudePruneConfig(**layer)),
            ("taylor", "1 of 6 layers", TaylorPruneConfig(**layer)),
            ("activation mean", "1 of 6 layers", ActivationPruneConfig(**layer))]
    # the reference for the layer rows: each layer dropped alone (named as the only target)
    runs += [("named", f"encoder.layer.{i} alone", MagnitudePruneConfig(granularity="layer", sparsity=0.99,
                                                                        targets=(f"encoder.layer.{i}",)))
             for i in range(6)]
    if "--alone" in sys.argv:
        runs = runs[-6:]
    print("| criterion | cut | kept | Spearman | pruning s |")
    print("|---|---|---|---|---|")
    for name, cut, cfg in runs:
        t0 = time.perf_counter()
        pruned = torchslim.apply(model, cfg, task=task)
        took = time.perf_counter() - t0
        if cfg.granularity == "head":
            kept = " ".join(str(lay.attention.self.num_attention_heads) for lay in pruned.encoder.layer)
        else:
            left = [lay.output.dense.weight for lay in pruned.encoder.layer]   # apply copies: match weights
            kept = "dropped " + ", ".join(f"encoder.layer.{i}" for i, m in enumerate(model.encoder.layer)
                                          if not any(torch.equal(m.output.dense.weight, w) for w in left))
        print(f"| {name} | {cut} | {kept} | {task.evaluate(pruned):.4f} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
