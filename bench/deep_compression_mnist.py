"""Deep Compression (Han et al. 2016) on MNIST, all three stages: the shipped Han et al. 2015
pruning recipes extended with k-means weight sharing and the artifact's entropy coding
(``recipes/deep-compression-kmeans-*.yaml``), their sizes on disk against the float baseline's.

Run (minutes each on 2 cores; the baseline training and pruning are most of it):

    python bench/deep_compression_mnist.py --data-dir ../shared/data --out runs/dck [--only lenet-5] [--reuse]
    python bench/deep_compression_mnist.py --data-dir ../shared/data --out runs/dck --from-pruned runs/dc

``--from-pruned DIR`` starts each run from the finished pruning run of the same model in
``DIR/NAME`` (``bench/deep_compression.py``'s output: its baseline and pruning checkpoints are
copied and the run resumes after them, so only the k-means step runs). ``--reuse`` reads finished
runs in ``OUT`` instead of running. Each row: test error of the float baseline, after pruning and
at the end; sizes on disk (``size_bytes`` of metrics.json: the saved artifacts' files) and the
ratio of the baseline's to the final one; the encoding and bytes of each weight's codes in the
final artifact; the paper's figures (Han et al. 2016, Tables 1-3) beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torchslim

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: recipe file -> (model, Deep Compression's error and compression rate for it: Table 1)
RUNS = {
    "deep-compression-kmeans-lenet-300-100.yaml": ("lenet-300-100", {"error": 0.0158, "ratio": 40}),
    "deep-compression-kmeans-lenet-5.yaml": ("lenet-5", {"error": 0.0074, "ratio": 39}),
    "deep-compression-kmeans-lenet-5-lowbit.yaml": ("lenet-5", {"error": 0.0074, "ratio": 39}),
}


def _copy_pruned(pruned: Path, partial: Path) -> None:
    """The baseline and pruning checkpoints of a finished run, copied (links followed) into the
    temporary directory a resumed run works in."""
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "steps").mkdir(parents=True)
    for step in ("00-baseline", "01-prune-magnitude"):
        shutil.copytree(pruned / "steps" / step, partial / "steps" / step, symlinks=False)
    shutil.copyfile(pruned / "recipe.yaml", partial / "recipe.yaml")


def codes_table(model_dir: Path) -> dict[str, tuple[str, int]]:
    """``{tensor: (encoding, bytes)}`` for the code tensors (``*.weight_q``) of an artifact."""
    from safetensors import safe_open

    manifest = json.loads((model_dir / "manifest.json").read_text())
    out = {}
    with safe_open(str(model_dir / "tensors.safetensors"), "pt") as f:
        for name, entry in manifest["tensors"].items():
            if name.endswith("weight_q"):
                size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in entry["parts"].values())
                out[name] = (entry["encoding"], size)
    return out


def summary(metrics: dict) -> dict:
    base, pruned, final = metrics["steps"][0], metrics["steps"][-2], metrics["steps"][-1]
    return {
        "error": tuple(round(1.0 - s["metric"]["value"], 4) for s in (base, pruned, final)),
        "size_bytes": (base["size_bytes"], pruned["size_bytes"], final["size_bytes"]),
        "ratio": round(base["size_bytes"] / final["size_bytes"], 2),
        "kmeans_wall_s": final.get("wall_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/dck")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", default=None, help="a recipe file name (or part of one)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of running")
    ap.add_argument("--from-pruned", default=None, help="finished Han pruning runs (DIR/lenet-300-100, DIR/lenet-5)")
    args = ap.parse_args()
    out = Path(args.out)
    for recipe, (model, paper) in RUNS.items():
        if args.only and args.only not in recipe:
            continue
        run = out / recipe.removeprefix("deep-compression-kmeans-").removesuffix(".yaml")
        if not args.reuse:
            resume = args.from_pruned is not None
            if resume:
                _copy_pruned(Path(args.from_pruned) / model, run.parent / f".{run.name}.partial")
            torchslim.compress(RECIPES / recipe, run, data_dir=args.data_dir, resume=resume)
        s = summary(json.loads((run / "metrics.json").read_text()))
        e = s["error"]
        print(f"{recipe}: error {e[0]:.2%} -> pruned {e[1]:.2%} -> {e[2]:.2%} (paper {paper['error']:.2%}); "
              f"size {s['size_bytes'][0]:,} -> {s['size_bytes'][1]:,} -> {s['size_bytes'][2]:,} B = "
              f"{s['ratio']}x (paper {paper['ratio']}x); k-means step {s['kmeans_wall_s']} s")
        for name, (enc, size) in codes_table(run / "model").items():
            print(f"    {name}: {enc}, {size:,} B")


if __name__ == "__main__":
    main()
