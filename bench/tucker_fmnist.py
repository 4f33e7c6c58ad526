"""Tucker-2 on a Fashion-MNIST ResNet-style CNN (``zoo:resnet-fmnist``): accuracy vs MACs at
several ranks, before and after a short fine-tune, latency timed interleaved at one thread.

    OMP_NUM_THREADS=1 python bench/tucker_fmnist.py --out bench-out/tucker [--energies 0.9 0.75 0.5 0.3]

The baseline is trained once (``--epochs``, the settings of recipes/structured-resnet-fmnist.yaml)
and saved as an artifact under ``--out``; a rerun reuses it. Each row factorizes every 3x3 convolution
(``factorize: {method: tucker, rank: E}``: per layer, the smallest ranks keeping the fraction E of
the energy of each channel mode; layers that would not shrink stay dense), measures test accuracy,
then fine-tunes ``--finetune-epochs`` and measures again. Latency: ``torch.utils.benchmark``
``blocked_autorange``, every model in turn for ``--rounds`` rounds, median of the round medians,
batch 1 and 16, 1 thread; ratios are to the dense model of the same rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import torchslim
from _timing import latency  # bench/_timing.py
from torchslim.factorize import TuckerFactorizeConfig
from torchslim.fileio import write_json
from torchslim.measure import count_macs, count_params
from torchslim.specs.tasks import build_task
from torchslim.train import TrainConfig, train

TRAIN = dict(optimizer="sgd", lr=0.05, batch_size=128, schedule="cosine", weight_decay=0.0005, loggers=())




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/tucker"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--energies", type=float, nargs="+", default=[0.9, 0.75, 0.5, 0.3])
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    task = build_task("fashion-mnist")
    base_dir = args.out / "baseline"
    if (base_dir / "manifest.json").is_file():
        dense = torchslim.load(base_dir)
    else:
        torch.manual_seed(0)
        dense = torchslim.build_model("zoo:resnet-fmnist")
        train(dense, task, TrainConfig(epochs=args.epochs, **TRAIN), desc="baseline")
        torchslim.save(dense, base_dir)
    x1 = task.example_inputs(1)
    rows = [{"name": "dense", "accuracy": task.evaluate(dense), "params": count_params(dense)[0],
             "macs": count_macs(dense, x1)}]
    models = {"dense": dense.eval()}
    print(rows[0], flush=True)
    for e in args.energies:
        t0 = time.process_time()
        cfg = TuckerFactorizeConfig(rank=e, targets=(r"re:.*",))
        fact = torchslim.apply(dense, cfg, task=task)
        row = {"name": f"tucker energy {e}", "accuracy_no_finetune": task.evaluate(fact),
               "params": count_params(fact)[0], "macs": count_macs(fact, x1)}
        if args.finetune_epochs:
            train(fact, task, TrainConfig(epochs=args.finetune_epochs, **{**TRAIN, "lr": 0.01}),
                  desc=f"finetune {e}")
        row["accuracy"] = task.evaluate(fact)
        row["cpu_s"] = round(time.process_time() - t0, 1)
        rows.append(row)
        models[row["name"]] = fact.eval()
        print(row, flush=True)
    for bs in (1, 16):
        ms = latency(models, task.example_inputs(bs)[0], args.rounds)
        for row in rows:
            row[f"latency_ms_bs{bs}"] = round(ms[row["name"]], 4)
            row[f"latency_x_bs{bs}"] = round(ms[row["name"]] / ms["dense"], 3)
    for row in rows:
        row["macs_x"] = round(row["macs"] / rows[0]["macs"], 3)
        row["params_x"] = round(row["params"] / rows[0]["params"], 3)
    write_json(args.out / "tucker.json", {"threads": args.threads, "rows": rows})
    print("| model | acc (no ft) | acc (ft) | params x | MACs x | latency bs1 x | latency bs16 x |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r.get('accuracy_no_finetune', r['accuracy']):.4f} | {r['accuracy']:.4f} | "
              f"{r['params_x']:.3f} | {r['macs_x']:.3f} | {r['latency_x_bs1']:.2f} | {r['latency_x_bs16']:.2f} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
