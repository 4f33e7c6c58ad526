"""Quantization-aware training vs post-training quantization: LeNet-5 on MNIST, 4-bit and
binary weights.

    OMP_NUM_THREADS=1 TORCHSLIM_DATA=/path/to/data python bench/qat_lenet5.py [--epochs 2] [--qat-epochs 1]
        [--baseline lenet5.safetensors]

zoo:lenet-5 is trained from scratch (SGD, cosine, ``--epochs``, seed 0; kept in ``--baseline``
when given, and read from there when the file exists), then every conv and
linear layer is quantized two ways from that same model:

- PTQ: round-to-nearest codes of the trained weights (``quantize.linear``: 4-bit symmetric per
  channel; binary: ``sign(w) * mean|w|`` per output channel);
- QAT: ``--qat-epochs`` more epochs with the weights fake-quantized (LSQ learned step sizes for
  4-bit through ``quantize: {method: linear, bits: 4, qat: {...}}``; binary through the
  ``FakeQuantPlugin`` with the straight-through estimator), then stored as the same layers.

Also reported: the float model fine-tuned for the same extra epochs (so QAT's gain is not just
more training). Test accuracy on the 10,000 MNIST test images; one thread.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchslim
from torchslim.edits import replace_module
from torchslim.layers import QuantConv2d, QuantLinear
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.methods.quantize.qat import store_codes
from torchslim.train import TrainConfig, train
from torchslim.train.qat import FakeQuantPlugin


def to_layers(model: nn.Module, plugin: FakeQuantPlugin) -> nn.Module:
    """Every conv / linear as a 2-bit symmetric per-channel layer holding the plugin's codes."""
    for name in plugin.targets:
        module = model.get_submodule(name)
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
        q = cls.from_float(module, bits=2, granularity="channel", symmetric=True)
        store_codes(plugin, model, name, q, ["weight"])
        replace_module(model, name, q)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--baseline", type=Path, default=None)
    args = ap.parse_args()
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
    targets = {n: ["weight"] for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    rows = [("float", 32, base)]
    longer = copy.deepcopy(base)
    train(longer, task, ft)
    rows.append((f"float + {args.qat_epochs} epoch{'s' * (args.qat_epochs != 1)}", 32, longer))
    rows.append(("4-bit PTQ", 4, torchslim.apply(base, LinearQuantConfig(bits=4))))
    rows.append(("4-bit QAT (LSQ)", 4, torchslim.apply(base, LinearQuantConfig(bits=4, qat=ft), task=task)))
    rows.append(("binary PTQ", 1, to_layers(copy.deepcopy(base), FakeQuantPlugin(targets, "binary"))))
    binary = copy.deepcopy(base)
    plugin = FakeQuantPlugin(targets, "binary")
    train(binary, task, ft, plugins=[plugin])
    rows.append(("binary QAT (STE)", 1, to_layers(binary, plugin)))
    print(f"\n| LeNet-5, MNIST | weight bits | test accuracy |\n|---|---|---|")
    for name, bits, model in rows:
        print(f"| {name} | {bits} | {task.evaluate(model.eval()):.4f} |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
