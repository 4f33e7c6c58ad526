"""int4 weight-only all-MiniLM-L6-v2 on STS-B: float compute on dequantized weights vs PyTorch's
CPU int4 kernel, one run.

    OMP_NUM_THREADS=1 python bench/int4_minilm.py [--rounds 3] [--sentences 512] [--out int4_minilm.json]

(``TORCHSLIM_DATA`` must hold ``stsbenchmark/``; about 5 minutes at one thread.) Models, built in
this one process and timed interleaved (``torch.utils.benchmark`` ``blocked_autorange`` 0.3 s, in
turns per batch size, ``--rounds`` times, median of the medians: ``bench/_timing.py``):

- ``fp32``: ``hf:minilm`` under ``inference_mode``;
- ``int4 dequant``: ``quantize.linear`` bits 4, symmetric, group 128 on every Linear, saved with
  ``torchslim.save`` and timed as ``torchslim.load`` gives it back (``QuantLinear``: the codes
  dequantized once, float32 compute);
- ``int4 kernel fp32``: that loaded model with each ``QuantLinear`` run by
  ``aten._weight_int4pack_mm_for_cpu`` on its codes (packed by
  ``aten._convert_weight_to_int4pack_for_cpu``) with float32 activations; timed at batch 1 only
  and its cosine taken on 64 sentences (it is 30-70x slower than the fp32 matmul per layer on
  this AVX2 CPU: a batch-32 pass takes about 20 s);
- ``int4 kernel bf16``: the same kernel fed bfloat16 activations (the input of each linear cast
  to bf16, the output back to float32), the path the kernel vectorizes on AVX2;
- ``int4 torchslim auto``: the torchslim path: ``quantize.linear`` bits 4, symmetric, group 128,
  ``kernel: auto`` (``Int4Linear``: the whole model timed on the int4 kernel against the
  dequantized weight at the task's example inputs of batch 1 and 32, the kernel kept up to the
  rows where it won), saved and timed as ``torchslim.load`` gives it back; its choice (the step
  row's ``int4`` entry) is printed and written to ``--out``. ``--skip-fp32-kernel`` leaves out the
  slow ``int4 kernel fp32`` row.

Fidelity: cosine of mean-pooled sentence embeddings to fp32's over the first ``--sentences``
test sentences (mean, min) and the STS-B test Spearman (x100).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.api import apply_
from torchslim.registry import get_method
from torchslim.session import Session
from torchslim.layers import QuantLinear
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.specs.stsb import _pad, mean_pool

from _timing import latency  # bench/_timing.py
from int8_minilm import stsb_inputs, tokens  # bench/int8_minilm.py

log = logging.getLogger("int4_minilm")
GROUP = 128
#: timed at batch 1 only, cosine on 64 sentences, no Spearman
SLOW = ("int4 kernel fp32",)


class Int4PackLinear(nn.Module):
    """A symmetric group-wise 4-bit ``QuantLinear`` run by PyTorch's CPU int4 kernel:
    (*, in) -> (*, out), activations cast to ``dtype`` for the kernel and back."""

    def __init__(self, q: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        codes, scale, _ = q._q_tensors("weight")
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.int() + 8).contiguous(), 1)
        self.sz = torch.stack([scale.t(), torch.zeros_like(scale).t()], -1).contiguous().to(dtype)
        self.bias = None if q.bias is None else q.bias.detach().to(dtype)
        self.group, self.dtype = q.group_size, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()   # the kernel reads A densely
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.sz)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def with_kernel(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            m.set_submodule(name, Int4PackLinear(mod, dtype))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-fp32-kernel", action="store_true", help="leave out the slow int4 kernel fp32 row")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    task, sentences, pad, inputs = stsb_inputs(args.sentences)
    fp32 = torchslim.build_model("hf:minilm").eval()
    with tempfile.TemporaryDirectory() as tmp:
        q = copy.deepcopy(fp32)
        apply_(q, LinearQuantConfig(bits=4, granularity="group", group_size=GROUP), task=task)
        torchslim.save(q, Path(tmp) / "int4")
        loaded = torchslim.load(Path(tmp) / "int4").eval()
        auto, ctx = copy.deepcopy(fp32), Session(task=task)
        get_method("quantize", "linear").handler(
            auto, LinearQuantConfig(bits=4, granularity="group", group_size=GROUP, kernel="auto"), ctx)
        choice = ctx.info["metrics"]["int4"]
        log.info("kernel auto: %s", choice)
        torchslim.save(auto, Path(tmp) / "int4-auto")
        auto_loaded = torchslim.load(Path(tmp) / "int4-auto").eval()
    models = {"fp32": fp32, "int4 dequant": loaded, "int4 kernel fp32": with_kernel(loaded, torch.float32),
              "int4 kernel bf16": with_kernel(loaded, torch.bfloat16), "int4 torchslim auto": auto_loaded}
    if args.skip_fp32_kernel:
        del models["int4 kernel fp32"]
    batches = [_pad(sentences[i:i + 32], max(map(len, sentences[i:i + 32])), pad) for i in range(0, len(sentences), 32)]
    fid = {}
    with torch.inference_mode():
        ref = torch.cat([mean_pool(tokens(fp32(*b)), b[1]) for b in batches])
        for name, m in models.items():
            some = batches[:2] if name in SLOW else batches
            emb = torch.cat([mean_pool(tokens(m(*b)), b[1]) for b in some])
            cos = F.cosine_similarity(emb, ref[:len(emb)], dim=-1)
            fid[name] = {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5),
                         "sentences": len(emb),
                         "spearman": None if name in SLOW else round(100 * task.evaluate(m, "test"), 2)}
            log.info("fidelity %s: %s", name, fid[name])
    lat: dict[str, dict[str, float]] = {n: {} for n in models}
    for b, x in inputs.items():
        timed = {n: (lambda x, m=m: m(*x)) for n, m in models.items() if b == "1" or n not in SLOW}
        for n, ms in latency(timed, x, args.rounds).items():
            lat[n][b] = round(ms, 3)
    print("| model | cos mean / min (sentences) | Spearman | bs1 ms (x fp32) | bs32 ms (x fp32) |")
    print("|---|---|---|---|---|")
    for name in models:
        f = fid[name]
        cells = [f"{lat[name][b]:.2f} ({lat[name][b] / lat['fp32'][b]:.2f})" if b in lat[name] else "-" for b in inputs]
        print(f"| {name} | {f['cos_mean']} / {f['cos_min']} ({f['sentences']}) | {f['spearman'] or '-'} | "
              + " | ".join(cells) + " |")
    print(f"kernel auto chose: {json.dumps(choice)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"shapes": {b: list(x[0].shape) for b, x in inputs.items()},
                                              "fidelity": fid, "latency_ms": lat, "int4_auto": choice}, indent=1))


if __name__ == "__main__":
    main()
