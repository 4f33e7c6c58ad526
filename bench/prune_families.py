"""Every torchvision classification family pruned by channels (vit_b_16 and swin_t by heads) at
50%: params and MACs of the pruned model over the dense one, and whether the artifact reloads
with identical outputs. The table of BENCHMARKS.md "Channel pruning on every torchvision
classification family".

    OMP_NUM_THREADS=1 python bench/prune_families.py --out bench-results/prune_families.json

Random init, ``num_classes=10``, one 64x64 image (vgg11: 32x32, the ViT: 224x224) for tracing
and counting; ``MagnitudePruneConfig(granularity=channel | head, sparsity=0.5)``, scope global,
no ignore list. MACs traced at batch 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import torchslim
from torchslim.fileio import write_json
from torchslim.measure import count_macs, count_params
from torchslim.prune import MagnitudePruneConfig

FAMILIES = {  # the smallest variant of each family, the input side used (as tests/test_prune_structured.py)
    "resnet18": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "efficientnet_b0": 64, "regnet_x_400mf": 64, "densenet121": 64,
    "shufflenet_v2_x0_5": 64, "squeezenet1_0": 64, "mnasnet0_5": 64, "convnext_tiny": 64,
    "vgg11": 32, "alexnet": 64, "googlenet": 64, "vit_b_16": 224, "swin_t": 64,
}
HEADS = ("vit_b_16", "swin_t")


def one(name: str, side: int, sparsity: float) -> dict:
    args = {"num_classes": 10}
    if name == "googlenet":
        args.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    model = torchslim.build_model(f"torchvision:{name}", args=args).eval()
    unit = "head" if name in HEADS else "channel"
    x = torch.randn(2, 3, side, side)
    t0 = time.perf_counter()
    pruned = torchslim.apply(model, MagnitudePruneConfig(granularity=unit, sparsity=sparsity),
                             task=f"shape:3x{side}x{side}").eval()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        torchslim.save(pruned, Path(d) / "a")
        y = pruned(x)
        reloaded = bool(torch.equal(torchslim.load(Path(d) / "a").eval()(x), y))
    return {"model": name, "unit": unit, "side": side, "outputs": list(y.shape),
            "params_x": round(count_params(pruned)[0] / count_params(model)[0], 3),
            "macs_x": round(count_macs(pruned, (x[:1],)) / count_macs(model, (x[:1],)), 3),
            "reload_identical": reloaded, "prune_s": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results/prune_families.json"))
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | unit | params x | MACs x | reloads identical | prune s |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = one(name, FAMILIES[name], args.sparsity)
        rows.append(r)
        print(f"| {name} | {r['unit']} | {r['params_x']:.3f} | {r['macs_x']:.3f} | {r['reload_identical']} | "
              f"{r['prune_s']:.1f} |", flush=True)
    write_json(args.out, {"sparsity": args.sparsity, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
