"""all-MiniLM-L6-v2 on STS-B: 25% of the attention heads, 25% of the FFN neurons, or 2 of the 6
layers removed, each followed by a short fine-tune, against the dense model fine-tuned alike.

Every model goes through torchslim: ``prune`` steps with ``granularity: head | channel | layer``
and ``finetune:`` (the one trainer on the STS-B training pairs, cosine-similarity regression on
the gold scores). The dense model gets the same fine-tune, so the comparison is of the cut alone;
Spearman on the test split (1,379 pairs) before and after the fine-tune (``--train-pairs N``: on
N training pairs drawn at random, the same for every model), params, MACs (16 tokens),
and eager latency at batch 1 and 32 (16 tokens), all models timed in turns in this process.

    OMP_NUM_THREADS=1 TORCHSLIM_DATA=../shared/data python bench/structured_minilm.py --out bench-out/structured-minilm --train-pairs 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import torchslim
from torchslim.fileio import write_json
from torchslim.prune import ActivationPruneConfig, MagnitudePruneConfig
from torchslim.train import TrainConfig, train

from _timing import latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/structured-minilm"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (models in turns)")
    ap.add_argument("--only", default="", help="comma-separated subset of dense,heads,ffn,layers")
    ap.add_argument("--train-pairs", type=int, default=0,
                    help="fine-tune on this many training pairs drawn at random (seed 0; 0: all 5,749)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    task = torchslim.build_task("stsb")
    if args.train_pairs:  # a short fine-tune: a fixed random subset of the training pairs
        full = task.split("train")
        pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:args.train_pairs]
        task._splits["train"] = torch.utils.data.Subset(full, pick.tolist())
    dense = torchslim.build_model("hf:minilm").eval()
    ft = TrainConfig(optimizer="adamw", lr=args.lr, epochs=args.epochs, batch_size=16, schedule="cosine",
                     warmup=0.1, weight_decay=0.01, seed=0, loggers=())
    cuts = {
        "heads": ("25% of heads, activation, global",
                  ActivationPruneConfig(granularity="head", sparsity=0.25, scope="global", samples=128)),
        "ffn": ("25% of FFN neurons, magnitude, per layer",
                MagnitudePruneConfig(granularity="channel", sparsity=0.25, scope="layer", targets=(r"re:.*intermediate\.dense",))),
        "layers": ("2 of 6 layers, activation",
                   ActivationPruneConfig(granularity="layer", sparsity=2 / 6, samples=128)),
    }
    only = set(filter(None, args.only.split(","))) or {"dense", *cuts}
    x = task.example_inputs(1)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "threads": torch.get_num_threads(), "rows": {}}
    models: dict[str, torch.nn.Module] = {"dense": dense}
    base = torchslim.measure(dense, task=task, latency=False)
    result["rows"]["dense"] = {"cut": "none", "spearman": base["metric"], "params": base["params"],
                               "macs": base["macs"]}
    print("dense", result["rows"]["dense"], flush=True)
    if "dense" in only:
        tuned = copy.deepcopy(dense)
        t0 = time.process_time()
        train(tuned, task, ft, desc="dense fine-tune")
        result["rows"]["dense fine-tuned"] = {"cut": "none", "spearman": task.evaluate(tuned),
                                              "params": base["params"], "macs": base["macs"],
                                              "cpu_s": round(time.process_time() - t0)}
        models["dense fine-tuned"] = tuned.eval()
        print("dense fine-tuned", result["rows"]["dense fine-tuned"], flush=True)
    for key, (label, cfg) in cuts.items():
        if key not in only:
            continue
        t0 = time.process_time()
        pruned = torchslim.apply(dense, cfg, task=task)
        before = task.evaluate(pruned)
        train(pruned, task, ft, desc=f"{key} fine-tune")
        m = torchslim.measure(pruned.eval(), task=task, latency=False)
        result["rows"][key] = {"cut": label, "spearman_pruned": before, "spearman": m["metric"],
                               "params": m["params"], "macs": m["macs"], "cpu_s": round(time.process_time() - t0)}
        models[key] = pruned
        print(key, result["rows"][key], flush=True)
        write_json(args.out / "structured_minilm.json", result)
    for bs in (1, 32):
        xb = task.example_inputs(bs)
        ms = latency({k: (lambda m: (lambda x: m(*x)))(m) for k, m in models.items()}, xb, args.rounds)
        for k, v in ms.items():
            result["rows"][k][f"latency_ms_bs{bs}"] = round(v, 2)
    write_json(args.out / "structured_minilm.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
