"""Short embedding-distillation run: all-MiniLM-L6-v2 into its layers 0, 2, 4 on STS-B sentences.

Run (about 10 min of CPU at one thread for one epoch):

    python bench/distill_minilm_short.py --data-dir ../shared/data [--epochs 1] [--lr 2e-4] [--loss mse+cosine]

The teacher is the bundled MiniLM (``hf:minilm``); the student starts as the teacher's layers 0,
2, 4 (``{from_teacher: {layers: [0, 2, 4]}}``) and is trained by ``distill.embedding`` on the
STS-B training sentences (adamw, batch 32, cosine schedule, a tenth of an epoch of warm-up,
weight decay 0.01), labels unused. Prints one JSON line: Spearman on the test split of the
student before and after training (and on val after), parameters, MACs (batch 1, 16 tokens),
eager latency of teacher and student at batch 1 and 32 (16 tokens). The teacher's test Spearman
is 0.8203 (BENCHMARKS.md), not measured again here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

import torchslim
from torchslim.distill import EmbeddingDistillConfig, FromTeacher, build_student
from torchslim.measure import count_macs, count_params, measure_latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--loss", default="mse+cosine")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    task = torchslim.build_task("stsb", data_dir=args.data_dir)
    teacher = torchslim.build_model("hf:minilm").eval()
    t0 = time.perf_counter()
    out = {"epochs": args.epochs, "lr": args.lr, "loss": args.loss}
    out["init_test"] = round(task.evaluate(build_student(FromTeacher(layers=(0, 2, 4)), teacher).eval()), 4)
    config = EmbeddingDistillConfig.from_dict({
        "student": {"from_teacher": {"layers": [0, 2, 4]}}, "loss": args.loss,
        "train": {"optimizer": "adamw", "lr": args.lr, "epochs": args.epochs, "batch_size": 32,
                  "schedule": "cosine", "warmup": 0.1, "weight_decay": 0.01, "loggers": []}})
    t1 = time.perf_counter()
    student = torchslim.apply(teacher, config, task=task).eval()
    out["train_s"] = round(time.perf_counter() - t1, 1)
    out["test"] = round(task.evaluate(student, "test"), 4)
    out["val"] = round(task.evaluate(student, "val"), 4)
    x1, x32 = task.example_inputs(1), task.example_inputs(32)
    for name, model in (("teacher", teacher), ("student", student)):
        out[f"{name}_params"] = count_params(model)[0]
        out[f"{name}_macs"] = count_macs(model, x1)
        out[f"{name}_ms_bs1"] = round(measure_latency(model, x1), 3)
        out[f"{name}_ms_bs32"] = round(measure_latency(model, x32), 3)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
