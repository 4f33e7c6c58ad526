"""Quantization-aware training vs post-training quantization: LeNet-5 on MNIST, 4-bit, binary
and ternary weights.

    OMP_NUM_THREADS=1 TORCHSLIM_DATA=/path/to/data python bench/qat_lenet5.py [--epochs 2] [--qat-epochs 1]
        [--baseline lenet5.safetensors] [--rows float,4bit,binary,ternary]

zoo:lenet-5 is trained from scratch (SGD, cosine, ``--epochs``, seed 0; kept in ``--baseline``
when given, and read from there when the file exists), then every conv and
linear layer is quantized two ways from that same model:

- PTQ: round-to-nearest codes of the trained weights (``quantize.linear``: 4-bit symmetric per
  channel; ``quantize.binary``: ``sign(w) * mean|w|`` per output channel; ``quantize.ternary``:
  TWN, 0 below ``0.7 mean|w|``, else ``sign(w)`` times the mean ``|w|`` above it, per channel);
- QAT: ``--qat-epochs`` more epochs with the weights fake-quantized (LSQ learned step sizes for
  4-bit through ``quantize: {method: linear, bits: 4, qat: {...}}``; binary and ternary through
  ``quantize: {method: binary / ternary, qat: {...}}`` with the straight-through estimator), then
  stored as the same layers (QuantConv2d / QuantLinear; CodedConv2d / CodedLinear).

Also reported (``--rows float``): the float model fine-tuned for the same extra epochs (so
QAT's gain is not just more training). ``--rows`` picks the row groups to run (each QAT row
costs one training run). Test accuracy on the 10,000 MNIST test images; one thread.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import torchslim
from torchslim.methods.quantize.binary import BinaryQuantConfig
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.methods.quantize.ternary import TernaryQuantConfig
from torchslim.train import TrainConfig, train

ROWS = ("float", "4bit", "binary", "ternary")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated row groups of {ROWS}")
    args = ap.parse_args()
    groups = args.rows.split(",")
    if set(groups) - set(ROWS):
        ap.error(f"--rows: {sorted(set(groups) - set(ROWS))} not in {ROWS}")
    torch.set_num_threads(1)
    task = torchslim.build_task("mnist")
    torch.manual_seed(0)
    base = torchslim.build_model("zoo:lenet-5")
    t0 = time.time()
    if args.baseline is not None and args.baseline.is_file():
        base.load_state_dict(load_file(str(args.baseline)))
    else:
        train(base, task, TrainConfig(epochs=args.epochs, loggers=()))
        print(f"baseline trained in {time.time() - t0:.0f} s")
        if args.baseline is not None:
            save_file(base.state_dict(), str(args.baseline))
    ft = TrainConfig(epochs=args.qat_epochs, lr=0.01, loggers=())
    rows = [("float", 32, base, 0.0)]

    def timed(name: str, bits: int, make) -> None:
        t = time.time()
        rows.append((name, bits, make(), time.time() - t))

    if "float" in groups:
        timed(f"float + {args.qat_epochs} epoch{'s' * (args.qat_epochs != 1)}", 32,
              lambda: train(copy.deepcopy(base), task, ft))
    if "4bit" in groups:
        timed("4-bit PTQ", 4, lambda: torchslim.apply(base, LinearQuantConfig(bits=4)))
        timed("4-bit QAT (LSQ)", 4, lambda: torchslim.apply(base, LinearQuantConfig(bits=4, qat=ft), task=task))
    for group, bits, cls in (("binary", 1, BinaryQuantConfig), ("ternary", 2, TernaryQuantConfig)):
        if group in groups:
            timed(f"{group} PTQ (quantize.{group})", bits, lambda: torchslim.apply(base, cls()))
            timed(f"{group} QAT (quantize.{group}, qat: STE)", bits,
                  lambda: torchslim.apply(base, cls(qat=ft), task=task))
    print(f"\n| LeNet-5, MNIST | weight bits | test accuracy | seconds |\n|---|---|---|---|")
    for name, bits, model, seconds in rows:
        print(f"| {name} | {bits} | {task.evaluate(model.eval()):.4f} | {seconds:.0f} |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
