"""Latency of the structured-pruning models of ``bench/structured_fmnist.py`` on every runtime
torchslim measures with (eager PyTorch, ``torch.compile``, ONNX Runtime), each model as it is and
with its BatchNorm folded into the convolutions (``fold.batchnorm``), all timed in turns.

    OMP_NUM_THREADS=1 python bench/structured_runtimes.py --run bench-out/plans --rounds 7

Reads ``--run/structured.json`` and the models it saved (``--run/model-N``; row 0 is the dense
model, rebuilt from ``--baseline``). Each (model, folding, runtime) is prepared once by
``torchslim.runtime`` (compilation and export outside the timed region) and timed with
``torch.utils.benchmark`` ``blocked_autorange`` (0.3 s) at batch ``--batch-size``; every round
times all of them in turn, and the median over ``--rounds`` is reported. Ratios are to the dense
model on the same runtime with the same folding (``x same``) and to the dense model as trained,
not folded, on the same runtime (``x dense``). Writes ``--run/runtimes-bsN.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

import torchslim
from torchslim.fileio import write_json
from torchslim.fold import BatchNormFoldConfig
from torchslim.runtime import get_runtime, omp_wait_policy
from torchslim.specs.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="an --out of bench/structured_fmnist.py")
    ap.add_argument("--baseline", type=Path, default=Path("bench-out/tucker/baseline"))
    ap.add_argument("--runtimes", default="eager,compile,onnxruntime")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=None, help="comma-separated row indices of structured.json (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task("fashion-mnist")
    rows = json.loads((args.run / "structured.json").read_text())["rows"]
    picked = range(len(rows)) if args.models is None else [int(i) for i in args.models.split(",")]
    models = {}
    for i in picked:
        m = torchslim.load(args.baseline if i == 0 else args.run / f"model-{i}").eval()
        models[(rows[i]["name"], "as is")] = m
        models[(rows[i]["name"], "BN folded")] = torchslim.apply(m, BatchNormFoldConfig(), task=task).eval()
    x = task.example_inputs(args.batch_size)
    runtimes = {name: get_runtime(name) for name in args.runtimes.split(",")}
    stmts, stack = {}, []
    for rt_name, rt in runtimes.items():
        for key, m in models.items():
            session = rt.prepare(m, x)
            with torch.no_grad():  # every runtime and folding computes what the model does
                torch.testing.assert_close(session(*x), models[(key[0], "as is")](*x), atol=1e-3, rtol=1e-3)
            ctx = session.bind(x)
            stmts[(*key, rt_name)] = ctx.__enter__()
            stack.append(ctx)
    per: dict[tuple, list[float]] = {k: [] for k in stmts}
    cpu0, t0 = time.process_time(), time.perf_counter()
    for r in range(args.rounds):
        for key, fn in stmts.items():
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=args.threads)
            per[key].append(timer.blocked_autorange(min_run_time=0.3).median * 1e3)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    for ctx in stack:
        ctx.__exit__(None, None, None)
    for rt in runtimes.values():
        rt.close()
    ms = {k: statistics.median(v) for k, v in per.items()}
    dense = rows[0]["name"]
    out = []
    for (name, fold, rt_name), v in ms.items():
        out.append({"model": name, "folding": fold, "runtime": rt_name, "ms": round(v, 4),
                    "x_same": round(v / ms[(dense, fold, rt_name)], 3),
                    "x_dense": round(v / ms[(dense, "as is", rt_name)], 3),
                    "rounds_ms": [round(t, 4) for t in per[(name, fold, rt_name)]]})
    target = args.run / f"runtimes-bs{args.batch_size}.json"
    write_json(target, {"threads": args.threads, "omp_wait_policy": omp_wait_policy(),
                        "batch_size": args.batch_size, "rounds": args.rounds,
                        "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                        "torch": torch.__version__, "rows": out})
    print(f"wrote {target}")
    print(f"| model | folding | {' | '.join(f'{r} ms (x same, x dense)' for r in runtimes)} |")
    print("|---|---|" + "---|" * len(runtimes))
    for key in models:
        cells = [f"{ms[(*key, r)]:.2f} ({ms[(*key, r)] / ms[(dense, key[1], r)]:.2f}, "
                 f"{ms[(*key, r)] / ms[(dense, 'as is', r)]:.2f})" for r in runtimes]
        print(f"| {key[0]} | {key[1]} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
