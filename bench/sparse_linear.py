"""Sparse execution benchmark: does ``torch.sparse`` beat a dense ``nn.Linear`` on this CPU?

Run (about 3 minutes on one thread):

    OMP_NUM_THREADS=1 python bench/sparse_linear.py [--out sparse.json] [--min-run-time 0.2]

For each weight shape (LeNet-300-100's first layer, 300x784, and an all-MiniLM-L6-v2
feed-forward layer, 1536x384), each unstructured sparsity (80, 90, 95, 98%: random positions,
the layout magnitude pruning gives an untrained layer) and each batch size (1, 32), the same
``y = x W^T + b`` is timed as:

- ``dense``: ``F.linear`` on the dense weight holding the zeros (the reference);
- ``csr mm``: ``torch.addmm(b, W_csr, x^T)^T`` with the weight as a ``torch.sparse_csr``
  tensor (MKL sparse BLAS; what ``torchslim.layers.SparseLinear`` runs);
- ``csr linear``: ``F.linear(x, W_csr, b)``, the same product through ``F.linear`` (it
  transposes differently, and raises under ``inference_mode``);
- ``bsr 4x4``: ``torch.sparse.mm`` of the weight as a ``sparse_bsr`` tensor of 4x4 blocks
  (only blocks holding a non-zero are stored; at these sparsities most blocks are not empty,
  so BSR keeps the zeros inside them), against ``x^T``.

Every variant of one configuration is timed interleaved (``torch.utils.benchmark``
``blocked_autorange`` in turns, ``--rounds`` times, under ``no_grad``: CSR ``F.linear`` raises under
``inference_mode``), and the median of the rounds' medians is
kept, so a slow phase of a shared machine hits all variants alike. Outputs are checked against
the dense result (``allclose`` at rtol 1e-4, atol 1e-5) before anything is timed. Printed:
milliseconds per call and, in brackets, dense / variant (above 1: the sparse kernel is faster).

2:4 semi-structured sparsity (``torch.sparse.to_sparse_semi_structured``) runs on CUDA only
(cuSPARSELt / CUTLASS kernels); the script tries it on a CPU tensor and reports the error.

A second table (no timing) gives the bytes each sparse encoding of torchslim's artifacts takes
for the same weights, and for 2:4 / 4:8 / 1:4 patterns (``nm_mask`` on random scores): bitmask,
relative-index, nm, the one the writer picks, and its bits per non-zero.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from torchslim.encodings import ENCODINGS, encode_tensor
from torchslim.methods.prune.primitives import nm_mask

SHAPES = {"lenet-300-100 fc1 (300x784)": (300, 784), "minilm ffn (1536x384)": (1536, 384)}
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
BATCHES = (1, 32)


def sparse_weight(out_f: int, in_f: int, sparsity: float, seed: int) -> torch.Tensor:
    """``[out_f, in_f]`` float32 with exactly ``round(sparsity * numel)`` zeros at random places."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    drop = torch.randperm(w.numel(), generator=g)[: int(round(sparsity * w.numel()))]
    w.view(-1)[drop] = 0.0
    return w


def variants(w: torch.Tensor, b: torch.Tensor) -> dict:
    csr = w.to_sparse_csr()
    bsr = w.to_sparse_bsr((4, 4))
    return {
        "dense": lambda x: F.linear(x, w, b),
        "csr mm": lambda x: torch.addmm(b[:, None], csr, x.t()).t(),
        "csr linear": lambda x: F.linear(x, csr, b),
        "bsr 4x4": lambda x: torch.sparse.mm(bsr, x.t()).t() + b,
    }


def time_interleaved(fns: dict, x: torch.Tensor, rounds: int, min_run_time: float) -> dict[str, float]:
    """Median over ``rounds`` of each variant's median seconds per call, variants in turns."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=1)
            per[name].append(t.blocked_autorange(min_run_time=min_run_time).median)
    return {k: statistics.median(v) for k, v in per.items()}


def semi_structured_on_cpu() -> str:
    try:
        from torch.sparse import to_sparse_semi_structured
        to_sparse_semi_structured(torch.zeros(64, 64))
    except Exception as exc:  # noqa: BLE001 (we report whatever refuses it)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "available"


def storage_rows() -> list[dict]:
    """Bytes of each sparse encoding for each weight shape and sparsity pattern."""
    rows = []
    for label, (out_f, in_f) in SHAPES.items():
        patterns = {f"{s:.0%}": sparse_weight(out_f, in_f, s, seed=i) for i, s in enumerate((0.5, *SPARSITIES))}
        for n, m in ((2, 4), (4, 8), (1, 4)):
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(m + n))
            patterns[f"{n}:{m}"] = w.masked_fill(~nm_mask(w.abs(), n, m), 0.0)
        for pattern, w in patterns.items():
            sizes = {}
            for name in ("bitmask", "relative-index", "nm"):
                out = ENCODINGS[name].encode(w)
                sizes[name] = None if out is None else sum(p.numel() * p.element_size() for p in out[0].values())
            chosen, parts, _ = encode_tensor(w)
            nbytes = sum(p.numel() * p.element_size() for p in parts.values())
            rows.append({"layer": label, "pattern": pattern, "dense": w.numel() * 4, **sizes, "chosen": chosen,
                         "bits_per_nonzero": round(8 * nbytes / int((w != 0).sum()), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--storage-only", action="store_true", help="print the storage table only (no timing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"torch {torch.__version__}, 1 thread; 2:4 semi-structured on CPU: {semi_structured_on_cpu()}")
    print("| layer | sparsity | batch | dense ms | csr mm | csr linear | bsr 4x4 |")
    print("|---|---|---|---|---|---|---|")
    for label, (out_f, in_f) in ({} if args.storage_only else SHAPES).items():
        for i, s in enumerate(SPARSITIES):
            w = sparse_weight(out_f, in_f, s, seed=i)
            b = torch.randn(out_f)
            fns = variants(w, b)
            for bs in BATCHES:
                x = torch.randn(bs, in_f)
                ref = fns["dense"](x)
                for name, fn in fns.items():
                    if not torch.allclose(fn(x), ref, rtol=1e-4, atol=1e-5):
                        raise SystemExit(f"{name} differs from dense at {label}, sparsity {s}, batch {bs}")
                with torch.no_grad():  # CSR linear fails under inference_mode (version counter)
                    t = time_interleaved(fns, x, args.rounds, args.min_run_time)
                row = {"layer": label, "out": out_f, "in": in_f, "sparsity": s, "batch": bs,
                       "ms": {k: round(v * 1e3, 5) for k, v in t.items()},
                       "speedup": {k: round(t["dense"] / v, 3) for k, v in t.items() if k != "dense"}}
                rows.append(row)
                print(f"| {label} | {s:.0%} | {bs} | {row['ms']['dense']:.4f} | "
                      + " | ".join(f"{row['ms'][k]:.4f} ({row['speedup'][k]:.2f}x)" for k in row["speedup"])
                      + " |", flush=True)
    storage = storage_rows()
    print("\n| layer | pattern | dense bytes | bitmask | relative-index | nm | chosen | bits / non-zero |")
    print("|---|---|---|---|---|---|---|---|")
    for r in storage:
        print(f"| {r['layer']} | {r['pattern']} | {r['dense']} | {r['bitmask']} | {r['relative-index']} | "
              f"{r['nm'] if r['nm'] is not None else '-'} | {r['chosen']} | {r['bits_per_nonzero']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": 1, "semi_structured_cpu": semi_structured_on_cpu(),
                       "rows": rows, "storage": storage}, f, indent=1)


if __name__ == "__main__":
    main()
