"""Structured pruning side by side: torchslim vs Torch-Pruning used directly vs torch.nn.utils.prune.

Run (1 thread; about 15 minutes on this 2-core machine):

    OMP_NUM_THREADS=1 python bench/prune_vs_torchpruning.py [--models resnet18,mobilenet_v2,vit_b_16]
        [--ratios 0.3,0.5] [--out bench-results/prune_vs_tp.json]

ViT models run twice: ``head`` granularity, and ``channel``: torchslim removes FFN neurons (the
residual width stays: the patch reshape is a view it cannot map), Torch-Pruning as its torchvision
example does (``round_to=num_heads``, ``model.hidden_dim`` set by hand after) also narrows the
residual width and with it every head. For each torchvision model (random init; pruning structure and speed do not depend on the
weights) and each ratio, scope global and uniform:

- **torchslim**: ``MagnitudePruneConfig(granularity=channel | head, sparsity=r, scope=...)`` with no
  ignore list (the classifier is kept automatically);
- **Torch-Pruning**: ``tp.pruner.MagnitudePruner`` with ``GroupMagnitudeImportance(p=1)``, the
  classifier in ``ignored_layers`` by hand (as its README shows), heads for ViT with
  ``num_heads``/``prune_num_heads=True``/``head_pruning_ratio=r`` (its pruner of torchvision's
  ``nn.MultiheadAttention`` narrows ``embed_dim`` with ``num_heads`` fixed, the residual width,
  so no head comes off: the rows say what it did);
- **torch.nn.utils.prune**: ``ln_structured`` (L1, dim 0) on every conv/linear but the classifier:
  masks only.

Columns: the fraction of heads / of conv filters and linear neurons removed (the sparsity reached: Torch-Pruning
keeps ``floor((1 - r) n)`` channels of ``n``, torchslim removes ``round(r n)``), params and MACs (traced, batch 1) and latency at batch 1 and 16 (eager,
``torch.utils.benchmark`` blocked_autorange, the variants timed interleaved in rounds, median of
the rounds), all as ratios to the dense model, and the time to prune.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils import benchmark

import torchslim
from torchslim.measure import count_macs
from torchslim.methods.prune.magnitude import MagnitudePruneConfig


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _shapes(m: nn.Module) -> list[tuple[int, ...]]:
    """Every parameter's shape in module order: equal lists are the same network, whose latency
    differs only by timing noise."""
    return [tuple(p.shape) for p in m.parameters()]


def removed(m: nn.Module, dense: nn.Module, granularity: str) -> float:
    """The sparsity reached: the fraction of attention heads removed (``head``), or of conv filters and
    linear neurons, the classifier's outputs left out (``channel``; tools round ``r * n`` to whole
    channels differently)."""
    def width(model: nn.Module) -> int:
        if granularity == "head":
            return sum(x.num_heads for x in model.modules() if type(x).__name__.endswith("MultiheadAttention"))
        return sum(x.out_channels if isinstance(x, nn.Conv2d) else x.out_features for x in model.modules()
                   if isinstance(x, nn.Conv2d) or (isinstance(x, nn.Linear) and x.out_features != 1000))
    return 1.0 - width(m) / width(dense)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {"image_size": SIZE} if name.startswith(("vit", "swin")) and SIZE != 224 else {}
    return torchvision.models.get_model(name, weights=None, **kw).eval()


def torchslim_prune(model: nn.Module, ratio: float, scope: str, granularity: str) -> nn.Module:
    cfg = MagnitudePruneConfig(granularity=granularity, sparsity=ratio, scope=scope)
    return torchslim.apply(model, cfg, task=f"shape:3x{SIZE}x{SIZE}")


def tp_prune(model: nn.Module, ratio: float, scope: str, granularity: str) -> nn.Module:
    import torch_pruning as tp
    model = copy.deepcopy(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    # its README: attention layers are declared with their head counts
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    if granularity == "head":
        # whole heads only (pruning_ratio 0 leaves every other width), as torchslim's head granularity
        kw = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                  pruning_ratio=0.0, ignored_layers=ignored)
    elif heads:  # its torchvision example for ViT: widths rounded to the head count, hidden_dim patched after
        kw = dict(ignored_layers=ignored, pruning_ratio=ratio, round_to=next(iter(heads.values())))
    else:
        kw = dict(ignored_layers=ignored, pruning_ratio=ratio)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       global_pruning=scope == "global", **kw)
    pruner.step()
    if hasattr(model, "hidden_dim") and hasattr(model, "conv_proj"):  # torchvision ViT reads it in forward
        model.hidden_dim = model.conv_proj.out_channels
    if granularity == "head":
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention) and m in pruner.num_heads:
                m.num_heads = pruner.num_heads[m]
    return model


def masks_prune(model: nn.Module, ratio: float, scope: str, granularity: str) -> nn.Module:
    import torch.nn.utils.prune as P
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not (isinstance(m, nn.Linear) and m.out_features == 1000):
            P.ln_structured(m, "weight", amount=ratio, n=1, dim=0)
            P.remove(m, "weight")
    return model


def time_rounds(models: dict[str, nn.Module], bs: int, rounds: int, min_run_time: float = 0.5) -> dict:
    x = torch.randn(bs, 3, SIZE, SIZE)
    got: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                t = benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=torch.get_num_threads())
                got[k].append(t.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {k: statistics.median(v) for k, v in got.items()}


SIZE = 224


def main() -> int:
    global SIZE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vit_b_16")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (variants in turns); median taken")
    ap.add_argument("--out", default="bench-results/prune_vs_tp.json")
    args = ap.parse_args()
    SIZE = args.size
    rows = []
    for name in args.models.split(","):
        dense = build(name)
        x1 = (torch.randn(1, 3, SIZE, SIZE),)
        base = {"params": _params(dense), "macs": count_macs(dense, x1)}
        # ViT: whole heads, and FFN neurons by channel (both tools leave the residual width alone)
        grans = ("head", "channel") if name.startswith("vit") else ("channel",)
        for ratio, granularity in [(float(r), g) for g in grans for r in args.ratios.split(",")]:
            for scope in ("global", "layer"):
                variants, prune_s, failed = {"dense": dense}, {}, {}
                tools = [("torchslim", torchslim_prune), ("torch-pruning", tp_prune)]
                if granularity == "channel" and scope == "layer" and not name.startswith("vit"):
                    tools.append(("nn.utils.prune", masks_prune))
                for tool, fn in tools:
                    t0 = time.perf_counter()
                    try:
                        variants[tool] = fn(dense, ratio, scope, granularity).eval()
                    except Exception as exc:  # reported in the table, the run goes on
                        failed[tool] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        continue
                    prune_s[tool] = time.perf_counter() - t0
                    try:
                        with torch.inference_mode():
                            variants[tool](*x1)
                    except Exception as exc:  # pruned into a model that no longer runs
                        failed[tool] = f"runs no more: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        del variants[tool]
                lat = {bs: time_rounds(variants, bs, args.rounds) for bs in (1, 16)}
                for tool, m in variants.items():
                    if tool == "dense":
                        continue
                    try:
                        macs = count_macs(m, x1)
                    except Exception as exc:
                        failed[tool] = f"runs no more: {type(exc).__name__}"
                        continue
                    rows.append({"model": name, "granularity": granularity, "ratio": ratio, "scope": scope,
                                 "tool": tool, "removed": round(removed(m, dense, granularity), 4),
                                 "params_ratio": round(_params(m) / base["params"], 4),
                                 "macs_ratio": round(macs / base["macs"], 4),
                                 "latency_bs1_ratio": round(lat[1][tool] / lat[1]["dense"], 3),
                                 "latency_bs16_ratio": round(lat[16][tool] / lat[16]["dense"], 3),
                                 "dense_ms_bs1": round(lat[1]["dense"], 2), "dense_ms_bs16": round(lat[16]["dense"], 2),
                                 "prune_s": round(prune_s[tool], 2)})
                    if tool == "torchslim" and "torch-pruning" in variants:  # the same network, layer by layer?
                        rows[-1]["same_shapes_as_tp"] = _shapes(m) == _shapes(variants["torch-pruning"])
                    print(json.dumps(rows[-1]), flush=True)
                for tool, why in failed.items():
                    rows.append({"model": name, "granularity": granularity, "ratio": ratio, "scope": scope,
                                 "tool": tool, "failed": why})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "size": SIZE, "rounds": args.rounds,
                               "rows": rows}, indent=1))
    print(f"{'model':13s} {'unit':7s} {'ratio':>5s} {'scope':6s} {'tool':15s} {'removed':>7s} {'params':>7s} "
          f"{'MACs':>6s} "
          f"{'bs1':>6s} {'bs16':>6s} {'prune s':>7s}")
    for r in rows:
        if "failed" in r:
            print(f"{r['model']:13s} {r['granularity']:7s} {r['ratio']:5.2f} {r['scope']:6s} {r['tool']:15s} "
                  f"failed: {r['failed']}")
        else:
            print(f"{r['model']:13s} {r['granularity']:7s} {r['ratio']:5.2f} {r['scope']:6s} {r['tool']:15s} "
                  f"{r['removed']:7.3f} {r['params_ratio']:7.3f} "
                  f"{r['macs_ratio']:6.3f} {r['latency_bs1_ratio']:6.3f} {r['latency_bs16_ratio']:6.3f} "
                  f"{r['prune_s']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
