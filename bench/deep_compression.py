"""Han et al. 2015 ("Learning both Weights and Connections", Deep Compression's first stage) on
MNIST: the shipped recipes run whole, their figures next to the paper's.

Run (minutes each on 2 cores; LeNet-5 is the slow one):

    python bench/deep_compression.py --data-dir ../shared/data --out runs/dc [--only lenet-5] [--reuse]

Each recipe in ``recipes/deep-compression-*.yaml`` is run with ``torchslim.compress`` into
``OUT/NAME`` (``--reuse`` reads a finished run there instead), then one row per model is printed
from its metrics.json: test error before and after, the kept fraction (non-zero parameters over
all, biases included), each layer's kept fraction of its weights, the size on disk of the saved
artifact before and after and their ratio, and the run's wall time; the paper's figures (Han et
al. 2015, Tables 1-3) beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torchslim

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: Han et al. 2015: baseline and pruned top-1 error (Table 1), kept weights per layer (Tables 2-3),
#: in the order of the zoo model's weight layers
PAPER = {
    "lenet-300-100": {"error": (0.0164, 0.0159), "kept": 0.08, "layers": {"1": 0.08, "3": 0.09, "5": 0.26}},
    "lenet-5": {"error": (0.0080, 0.0077), "kept": 0.08,
                "layers": {"0": 0.66, "2": 0.12, "5": 0.08, "7": 0.19}},
}
#: the paper's layer names for the zoo models' module names
LABELS = {"lenet-300-100": {"1": "fc1", "3": "fc2", "5": "fc3"},
          "lenet-5": {"0": "conv1", "2": "conv2", "5": "fc1", "7": "fc2"}}


def summary(metrics: dict) -> dict:
    """The figures of one finished run (metrics.json content)."""
    base, final = metrics["steps"][0], metrics["steps"][-1]
    layers = {name: round(1.0 - s, 4) for name, s in final.get("layer_sparsity", {}).items()}
    return {
        "error": (round(1.0 - base["metric"]["value"], 4), round(1.0 - final["metric"]["value"], 4)),
        "kept": round(final["nonzero_params"] / final["params"], 4),
        "layers": layers,
        "size_bytes": (base["size_bytes"], final["size_bytes"]),
        "size_ratio": round(base["size_bytes"] / final["size_bytes"], 2),
        "wall_s": round(metrics["run"]["wall_s"] or sum(s.get("wall_s", 0.0) for s in metrics["steps"]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder holding mnist/ (default: $TORCHSLIM_DATA)")
    ap.add_argument("--out", default="runs/dc", help="runs go to OUT/NAME")
    ap.add_argument("--only", choices=sorted(PAPER), help="one model only")
    ap.add_argument("--reuse", action="store_true", help="read OUT/NAME/metrics.json instead of running")
    args = ap.parse_args()
    rows = {}
    for name in [args.only] if args.only else sorted(PAPER):
        out = Path(args.out) / name
        if args.reuse:
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = torchslim.compress(RECIPES / f"deep-compression-{name}.yaml", out, data_dir=args.data_dir)
        rows[name] = summary(metrics)
    print("| model | test error before -> after | paper | kept | paper | kept per layer | paper "
          "| size on disk before -> after | ratio | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p = PAPER[name]
        print(f"| {name} | {100 * r['error'][0]:.2f}% -> {100 * r['error'][1]:.2f}% "
              f"| {100 * p['error'][0]:.2f}% -> {100 * p['error'][1]:.2f}% "
              f"| {100 * r['kept']:.2f}% | {100 * p['kept']:.0f}% "
              f"| {', '.join(f'{LABELS[name][k]} {100 * v:.1f}%' for k, v in r['layers'].items())} "
              f"| {', '.join(f'{LABELS[name][k]} {100 * v:.0f}%' for k, v in p['layers'].items())} "
              f"| {r['size_bytes'][0]:,} -> {r['size_bytes'][1]:,} B | {r['size_ratio']:.2f}x | {r['wall_s']:.0f} s |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
