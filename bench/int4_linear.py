"""Weight-only int4/int8 linear kernels on MiniLM's shapes: time ratio to fp32 and error.

    OMP_NUM_THREADS=1 python bench/int4_linear.py [--rounds 3] [--out int4_linear.json]

For each weight shape of all-MiniLM-L6-v2's linears ((out, in) = 384x384, 1536x384, 384x1536)
and each input of ``rows`` rows (16: batch 1 at 16 tokens; 512: batch 32), one process times,
in turns (``bench/_timing.py``: ``blocked_autorange`` 0.3 s, ``--rounds`` times, median):

- ``fp32``: ``F.linear`` on the float32 weight (what QuantLinear runs today on its kept weight);
- ``dequant``: the codes dequantized on every call, then ``F.linear`` (unpacking in Python);
- ``int4 gG``: ``aten._weight_int4pack_mm_for_cpu`` on the codes packed by
  ``aten._convert_weight_to_int4pack_for_cpu`` (4-bit symmetric, a scale per group of G inputs);
- ``int8``: ``aten._weight_int8pack_mm`` (8-bit symmetric per output channel codes);
- ``int4 g64 bf16`` / ``int8 bf16``: the same kernels fed bfloat16 activations (and bf16 scales),
  the input cast to bf16 and the output back to float32 inside the timed call (on this AVX2
  CPU both kernels are 30-70x slower than the fp32 matmul with float32 activations).

Error: the largest |y - y_ref| / max |y_ref| where ``y_ref`` is the float64 product of the input
and the same dequantized weight (so it measures the kernel, not the quantization).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from torchslim.methods.quantize import primitives as P

from _timing import latency  # bench/_timing.py

SHAPES = ((384, 384), (1536, 384), (384, 1536))
ROWS = (16, 512)
GROUPS = (32, 64, 128)


def int4_operands(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8, scales_and_zeros (K/g, N, 2), float64 dequantized weight) of ``w``."""
    s, z = P.choose_qparams(w, 4, "group", group, True)
    q = P.quantize(w, s, z, 4, "group", group, True)                     # int8 in [-7, 7]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.int() + 8).contiguous(), 1)
    sz = torch.stack([s.t(), torch.zeros_like(s).t()], -1).contiguous()  # w = (u - 8) * s + 0
    return packed, sz, P.dequantize(q, s, z, "group", group, torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k) / k ** 0.5
        b = torch.randn(n) * 0.01
        s8, z8 = P.choose_qparams(w, 8, "channel", 128, True)
        q8 = P.quantize(w, s8, z8, 8, "channel", 128, True)
        s4, z4 = P.choose_qparams(w, 4, "group", 128, True)
        q4 = P.quantize(w, s4, z4, 4, "group", 128, True)
        fns, refs = {}, {}
        fns["fp32"] = lambda x, w=w: F.linear(x, w, b)
        refs["fp32"] = w.double()
        fns["dequant"] = lambda x: F.linear(x, P.dequantize(q4, s4, z4, "group", 128), b)
        refs["dequant"] = P.dequantize(q4, s4, z4, "group", 128, torch.float64)
        for g in GROUPS:
            packed, sz, ref = int4_operands(w, g)
            fns[f"int4 g{g}"] = (lambda x, p=packed, sz=sz, g=g:
                                 torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, sz) + b)
            refs[f"int4 g{g}"] = ref
        s8v = s8.reshape(-1).contiguous()
        fns["int8"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8v) + b
        refs["int8"] = P.dequantize(q8, s8, z8, "channel", 128, torch.float64)
        packed, sz, _ = int4_operands(w, 64)
        sz16, s8v16, b16 = sz.bfloat16(), s8v.bfloat16(), b.bfloat16()
        fns["int4 g64 bf16"] = lambda x: (torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), packed, 64, sz16) + b16).float()
        refs["int4 g64 bf16"] = refs["int4 g64"]
        fns["int8 bf16"] = lambda x: (torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, s8v16) + b16).float()
        refs["int8 bf16"] = refs["int8"]
        for rows in ROWS:
            x = torch.randn(rows, k)
            err = {}
            with torch.inference_mode():
                for name, fn in fns.items():
                    y_ref = x.double() @ refs[name].t() + b.double()
                    err[name] = float((fn(x).double() - y_ref).abs().max() / y_ref.abs().max())
            ms = latency(fns, x, args.rounds)
            row = {"shape": f"{n}x{k}", "rows": rows, "ms": ms,
                   "ratio": {name: ms[name] / ms["fp32"] for name in ms}, "rel_err": err}
            results.append(row)
            print(f"{n}x{k} rows {rows}: fp32 {ms['fp32']:.3f} ms; " + "; ".join(
                f"{name} {row['ratio'][name]:.2f}x err {err[name]:.1e}" for name in ms if name != "fp32"), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
