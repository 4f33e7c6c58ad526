"""bf16 / fp16 compute against fp32 on this CPU: all-MiniLM-L6-v2 (hf:minilm) cast whole to
bfloat16 and float16, eager, one thread, timed in turns with fp32 on real STS-B test sentences
(batch 1: the first sentence; batch 32: the first 32, padded).

    OMP_NUM_THREADS=1 TORCHSLIM_DATA=../shared/data python bench/half_minilm.py [--rounds 3]

Prints, per batch size, the median ms of each and its ratio to fp32. ``quantize.float`` stores
bf16/fp16/fp8 weights narrow and computes in float32; this is the measurement behind that choice.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import torchslim
from _timing import latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = torchslim.build_task("stsb")
    fp32 = torchslim.build_model("hf:minilm").eval()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
              "fp16": copy.deepcopy(fp32).to(torch.float16)}
    for bs in (1, 32):
        x = task.example_inputs(bs)
        ms = latency({k: (lambda m: (lambda x: m(*x)))(m) for k, m in models.items()}, x, args.rounds)
        print(json.dumps({"batch_size": bs, "ms": {k: round(v, 1) for k, v in ms.items()},
                          "x_fp32": {k: round(v / ms["fp32"], 2) for k, v in ms.items()}}), flush=True)


if __name__ == "__main__":
    main()
