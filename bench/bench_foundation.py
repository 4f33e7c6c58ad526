"""Foundation benchmark: torchslim's first methods side by side with PyTorch's built-in peers.

Run (about 2 minutes on 2 cores):

    python bench/bench_foundation.py --data-dir ../shared/data [--out bench-results.json]

One process, one trained model, the same inputs for every row, so ratios are fair on a noisy
machine. Rows:

- dense baseline (LeNet-300-100 on MNIST, trained here for a few epochs);
- unstructured 90% global magnitude pruning, one-shot, no fine-tuning:
  torchslim ``prune.magnitude`` vs ``torch.nn.utils.prune.global_unstructured(L1Unstructured)``;
  bytes on disk: torchslim artifact (bitmask encoding) vs ``torch.save(state_dict)``;
- int8 weights: torchslim ``quantize.linear`` (per-channel, symmetric) vs
  ``torch.ao.quantization.quantize_dynamic`` (int8 per-tensor weights + dynamic activations);
- the torchslim int8 model exported to ONNX and run under ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchslim
from torchslim.measure import count_params, measure_latency
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.train import TrainConfig, train


def torch_save_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def row(name: str, model: nn.Module, task, size: int, extra: dict | None = None) -> dict:
    x1, x32 = task.example_inputs(1), task.example_inputs(32)
    params, nnz = count_params(model)
    return {"name": name, "params": params, "nonzero": nnz, "size_bytes": size,
            "latency_ms_bs1": round(measure_latency(model, x1), 4),
            "latency_ms_bs32": round(measure_latency(model, x32), 4),
            "accuracy": round(task.evaluate(model), 4), **(extra or {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    task = torchslim.build_task("mnist", args.data_dir)
    torch.manual_seed(0)
    base = torchslim.build_model("zoo:lenet-300-100")
    t0 = time.perf_counter()
    train(base, task, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=128, loggers=()))
    base.eval()
    print(f"trained baseline in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp())
    row("warm-up", base, task, 0)  # the process's first timings pay for thread-pool start-up
    rows = [row("dense baseline (torch.save)", base, task, torch_save_bytes(base))]
    rows[-1]["size_bytes_torchslim_artifact"] = torchslim.save(base, tmp / "base")

    # -- pruning --------------------------------------------------------------------------
    t0 = time.perf_counter()
    ts_pruned = torchslim.apply(base, MagnitudePruneConfig(sparsity=0.9, scope="global"))
    t_ts = time.perf_counter() - t0
    rows.append(row("torchslim prune.magnitude 90% global (artifact)", ts_pruned, task,
                    torchslim.save(ts_pruned, tmp / "pruned"), {"apply_s": round(t_ts, 4)}))
    import torch.nn.utils.prune as tprune
    tp_pruned = copy.deepcopy(base)
    t0 = time.perf_counter()
    params = [(m, "weight") for m in tp_pruned.modules() if isinstance(m, nn.Linear)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.9)
    for m, n in params:
        tprune.remove(m, n)
    t_tp = time.perf_counter() - t0
    rows.append(row("torch.nn.utils.prune global L1 90% (torch.save)", tp_pruned, task,
                    torch_save_bytes(tp_pruned), {"apply_s": round(t_tp, 4)}))

    # -- int8 -----------------------------------------------------------------------------
    ts_q = torchslim.apply(base, LinearQuantConfig(bits=8, granularity="channel"))
    rows.append(row("torchslim quantize.linear int8 per-channel (artifact)", ts_q, task,
                    torchslim.save(ts_q, tmp / "int8")))
    tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    rows.append(row("torch.ao quantize_dynamic int8 (torch.save)", tq, task, torch_save_bytes(tq)))
    both = torchslim.apply(ts_pruned, LinearQuantConfig(bits=8))
    rows.append(row("torchslim prune 90% + int8 (artifact)", both, task, torchslim.save(both, tmp / "both")))

    # -- ONNX Runtime ----------------------------------------------------------------------
    try:
        from torchslim.measure import measure_latency_onnx
        from torchslim.methods.export import export_onnx
        path = export_onnx(ts_q, task.example_inputs(1), tmp / "int8.onnx")
        lat = measure_latency_onnx(path, task)
        rows.append({"name": "torchslim int8 exported, ONNX Runtime", "size_bytes": path.stat().st_size,
                     "latency_ms_bs1": lat["1"], "latency_ms_bs32": lat["32"]})
    except Exception as exc:  # onnx extra missing
        print(f"ONNX row skipped: {exc}", file=sys.stderr)

    b = rows[0]
    for r in rows:
        r["size_x_vs_dense"] = round(b["size_bytes"] / r["size_bytes"], 2)
        r["latency_bs1_x_vs_dense"] = round(r["latency_ms_bs1"] / b["latency_ms_bs1"], 2)
        r["latency_bs32_x_vs_dense"] = round(r["latency_ms_bs32"] / b["latency_ms_bs32"], 2)
    cols = ["name", "accuracy", "nonzero", "size_bytes", "size_x_vs_dense", "latency_ms_bs1",
            "latency_bs1_x_vs_dense", "latency_ms_bs32", "latency_bs32_x_vs_dense"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"\nenvironment: {env}")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
