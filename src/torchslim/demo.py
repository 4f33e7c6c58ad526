"""``torchslim demo``: the whole pipeline on the built-in digits task, in about a minute.

baseline digits-cnn (trained) -> distill into a narrower student (2.5x fewer params) -> gradual magnitude
pruning with fine-tuning -> int8 per-channel weights -> export (artifact + ONNX) -> report.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

from .artifact import load
from .pipeline import run_recipe
from .recipe import Recipe
from .report import format_table
from .specs.tasks import build_task

log = logging.getLogger(__name__)


def demo_recipe(onnx: bool = True) -> dict:
    """The demo's recipe as a plain mapping (the same thing a YAML file would hold)."""
    return {
        "model": {"spec": "zoo:digits-cnn"},
        "task": "digits",
        "train": {"optimizer": "adamw", "epochs": 30, "lr": 0.003, "batch_size": 64,
                  "schedule": "cosine", "weight_decay": 0.0001, "label_smoothing": 0.1, "seed": 0},
        "steps": [
            {"distill": {"method": "logits", "student": {"spec": "zoo:digits-cnn",
                                                         "args": {"channels": [24, 48], "hidden": 64}},
                         "temperature": 4.0, "alpha": 0.9, "optimizer": "adamw", "epochs": 40,
                         "lr": 0.003, "schedule": "cosine", "seed": 0}},
            {"prune": {"method": "magnitude", "sparsity": 0.7, "scope": "global", "schedule": "gradual",
                       "finetune": {"optimizer": "adamw", "epochs": 20, "lr": 0.002, "schedule": "cosine"}}},
            {"quantize": {"method": "linear", "bits": 8, "granularity": "channel"}},
            {"export": {"formats": ["artifact", "onnx"] if onnx else ["artifact"]}},
        ],
    }


def run_demo(out: str | Path = "torchslim-demo", *, data_dir: str | None = None,
             print_fn: Callable[[str], None] = log.info, resume: bool = False) -> dict:
    """Run the demo recipe into ``out`` (``resume``: continue an interrupted demo) and print the
    before/after table; returns the metrics."""
    has_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    if not has_onnx:
        log.warning("onnx/onnxruntime not installed: the demo skips ONNX export "
                    "(pip install 'torchslim[onnx]')")
    recipe = Recipe.from_dict(demo_recipe(onnx=has_onnx))
    metrics = run_recipe(recipe, out, data_dir=data_dir, resume=resume)
    print_fn(format_table(metrics))
    base, final = metrics["steps"][0], metrics["steps"][-1]
    reloaded = load(Path(out) / "model")
    acc = build_task("digits").evaluate(reloaded)
    print_fn(f"\nsize on disk: {base['size_bytes']:,} B -> {final['size_bytes']:,} B "
             f"({base['size_bytes'] / final['size_bytes']:.1f}x smaller); accuracy "
             f"{base['metric']['value']:.4f} -> {final['metric']['value']:.4f}; "
             f"reloaded {Path(out) / 'model'}: accuracy {acc:.4f}")
    print_fn(f"report: {Path(out) / 'report.html'}")
    return metrics
