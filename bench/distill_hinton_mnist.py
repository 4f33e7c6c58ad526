"""Hinton et al. (2015), sec. 3 on MNIST: a 2x1200 teacher (dropout, inputs jittered by up to 2
pixels) and a 2x800 student, the student trained alone vs distilled at T = 20.

Paper: the student alone makes 146 test errors, distilled 74; the teacher 67.

Every model goes through torchslim: ``zoo:mlp``, the one trainer (``jitter``, ``dropout``), the
``distill.logits`` step (the ``LogitDistillation`` plugin). The teacher is saved as an artifact in
``--out`` and reused by a rerun (``torchslim.load``), so the two students can be rerun alone.

    OMP_NUM_THREADS=1 python bench/distill_hinton_mnist.py --out bench-out/hinton
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import torchslim
from torchslim.distill import LogitsDistillConfig
from torchslim.fileio import write_json
from torchslim.specs.tasks import build_task
from torchslim.train import TrainConfig, train


def errors(model: torch.nn.Module, task) -> int:
    """Test-set errors (of 10,000)."""
    return round((1.0 - task.evaluate(model, "test")) * len(task.split("test")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/hinton"))
    ap.add_argument("--teacher-epochs", type=int, default=100)
    ap.add_argument("--student-epochs", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="epochs of linear lr warm-up of both students (the teacher has none): without it the distilled run at "
                         "lr 0.05 diverges or lands far off (see BENCHMARKS.md)")
    ap.add_argument("--jitter", type=int, default=0,
                    help="shift the students' training images by up to this many pixels (the distilled "
                         "student's teacher sees the same shifted images: a jittered transfer set)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    task = build_task("mnist")
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "paper": {"teacher": 67, "student_alone": 146, "student_distilled": 74}}
    common = dict(optimizer="sgd", lr=args.lr, momentum=0.9, batch_size=128, schedule="cosine",
                  warmup=args.warmup,
                  loggers=(), seed=args.seed)

    teacher_dir = args.out / "teacher"
    t0 = time.process_time()
    if (teacher_dir / "manifest.json").is_file():
        teacher = torchslim.load(teacher_dir)
        result["teacher_reused"] = True
    else:
        torch.manual_seed(args.seed)
        teacher = torchslim.build_model("zoo:mlp", args={"hidden": [1200, 1200], "dropout": 0.5,
                                                         "input_dropout": 0.2})
        train(teacher, task, TrainConfig(epochs=args.teacher_epochs, jitter=2, **{**common, "warmup": 0.0}), desc="teacher")
        torchslim.save(teacher, teacher_dir)
    result["teacher"] = {"test_errors": errors(teacher, task), "cpu_s": round(time.process_time() - t0, 1)}
    print("teacher", result["teacher"], flush=True)

    student_spec = {"spec": "zoo:mlp", "args": {"hidden": [800, 800]}}
    t0 = time.process_time()
    torch.manual_seed(args.seed)
    alone = torchslim.build_model("zoo:mlp", args={"hidden": [800, 800]})
    train(alone, task, TrainConfig(epochs=args.student_epochs, jitter=args.jitter, **common), desc="student alone")
    result["student_alone"] = {"test_errors": errors(alone, task), "cpu_s": round(time.process_time() - t0, 1)}
    print("student alone", result["student_alone"], flush=True)

    t0 = time.process_time()
    cfg = LogitsDistillConfig.from_dict({"teacher": "current", "student": student_spec,
                                         "temperature": args.temperature, "alpha": args.alpha,
                                         "train": {"epochs": args.student_epochs, "jitter": args.jitter, **common,
                                                   "loggers": []}})
    distilled = torchslim.apply(teacher, cfg, task=task)
    result["student_distilled"] = {"test_errors": errors(distilled, task),
                                   "cpu_s": round(time.process_time() - t0, 1)}
    print("student distilled", result["student_distilled"], flush=True)
    write_json(args.out / ("hinton.json" if not args.jitter else f"hinton-jitter{args.jitter}.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
