"""Low-rank benchmark: SVD of all-MiniLM-L6-v2's feed-forward layers at several ranks, no fine-tuning.

Run (a few minutes at one thread):

    python bench/factorize.py --data-dir ../shared/data [--ranks 256 192 128 64] [--out rows.json]

One process, the bundled MiniLM (``hf:minilm``) on STS-B test (``stsb``), the same inputs for
every row. Targets are the 12 feed-forward Linears (``encoder.layer.N.intermediate.dense``,
384 -> 1536, and ``encoder.layer.N.output.dense``, 1536 -> 384; a rank-r pair holds
r * 1920 weights instead of 589,824, smaller below r = 307); attention and the word embedding
stay dense. Per row: Spearman on the test split, parameters, MACs (batch 1, 16 tokens),
eager latency at batch 1 and 32 (16 tokens), and the energy the ranks keep.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import torchslim
from torchslim.factorize import SVDFactorizeConfig
from torchslim.measure import count_macs, count_params, measure_latency
from torchslim.methods.factorize.svd import _factorize_svd
from torchslim.session import Session

FFN = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"


def row(name: str, model: torch.nn.Module, task, evaluate: bool = True, **extra) -> dict:
    x1, x32 = task.example_inputs(1), task.example_inputs(32)
    t0 = time.perf_counter()
    metric = task.evaluate(model) if evaluate else float("nan")
    return {"name": name, "spearman": round(metric, 4), "params": count_params(model)[0],
            "macs": count_macs(model, x1), "latency_ms_bs1": round(measure_latency(model, x1), 3),
            "latency_ms_bs32": round(measure_latency(model, x32), 3),
            "eval_s": round(time.perf_counter() - t0, 1), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[256, 192, 128, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--latency-only", action="store_true", help="skip the Spearman evaluation (a quick re-timing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = torchslim.build_task("stsb", args.data_dir)
    base = torchslim.build_model("hf:minilm").eval()
    measure_latency(base, task.example_inputs(1))        # thread-pool start-up out of the first row
    evaluate = not args.latency_only
    rows = [row("dense", base, task, evaluate)]
    for rank in args.ranks:
        session = Session(task=task)   # the handler itself, to read the spectra it records
        t0 = time.perf_counter()
        small = _factorize_svd(copy.deepcopy(base), SVDFactorizeConfig(rank=rank, targets=(FFN,)), session).eval()
        spent = time.perf_counter() - t0
        spectra = session.info["metrics"]["spectra"]
        s = {name: torch.linalg.svdvals(base.get_submodule(name).weight.detach().double()) for name in spectra}
        energy = sum(float(v[:rank].square().sum() / v.square().sum()) for v in s.values()) / len(s)
        rows.append(row(f"svd rank {rank}", small, task, evaluate, factorize_s=round(spent, 1),
                        energy_kept=round(energy, 4)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    dense = rows[0]
    print("| model | Spearman | delta (pt) | params | MACs | MACs x | energy kept | bs1 ms | bs1 x | bs32 ms | bs32 x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['spearman']:.4f} | {100 * (r['spearman'] - dense['spearman']):+.2f} | "
              f"{r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {dense['macs'] / r['macs']:.2f} | "
              f"{r.get('energy_kept', 1.0):.3f} | {r['latency_ms_bs1']:.2f} | "
              f"{r['latency_ms_bs1'] / dense['latency_ms_bs1']:.2f} | {r['latency_ms_bs32']:.2f} | "
              f"{r['latency_ms_bs32'] / dense['latency_ms_bs32']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
