"""Per-layer quantization error (``quantized_layers``) on all-MiniLM-L6-v2 (hf:minilm), STS-B:
what the table says per method, and what measuring it costs.

Run (about 5 min of CPU at one thread, most of it GPTQ):

    python bench/quant_report_minilm.py --data-dir ../shared/data [--methods int8,int8-dynamic,rtn4,gptq4,kmeans4]
        [--plot-dir DIR]

Each method quantizes every Linear (encoder and pooler, ``re:.*``) of a fresh copy of MiniLM through
its registered handler, as a step would; the time spent in
:class:`~torchslim.methods.quantize.layer_error.FloatReference` (the float copy, the calibration
forward passes with hooks, each quantized layer on its captured inputs) is timed apart from the
handler's total. Prints one JSON line per method: layers, output SQNR (median, lowest and its
layer), weight SQNR median, the handler's seconds and the measurement's. With ``--plot-dir``, each
method's row is written as a one-step metrics.json and its report plot ``quantization.png`` is
drawn there (``DIR/METHOD/plots/quantization.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import torchslim
from torchslim.methods.quantize import layer_error
from torchslim.registry import get_method
from torchslim.session import Session

METHODS = {
    "int8": ("quantize.linear", {"bits": 8}),
    "int8-dynamic": ("quantize.linear", {"bits": 8, "activations": "dynamic", "kernel": "int8"}),
    "rtn4": ("quantize.linear", {"bits": 4, "granularity": "group", "group_size": 128}),
    "gptq4": ("quantize.gptq", {"bits": 4, "granularity": "group", "group_size": 128,
                                "calibration": {"samples": 128}}),
    "kmeans4": ("quantize.kmeans", {"bits": 4}),
}


class _Timed:
    """Seconds spent in FloatReference (its copy in __init__, its measurement in record)."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        ref = layer_error.FloatReference
        init, record = ref.__init__, ref.record

        def timed(fn):
            def run(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    cls.seconds += time.perf_counter() - t
            return run

        ref.__init__, ref.record = timed(init), timed(record)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--plot-dir", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    _Timed.install()
    task = torchslim.build_task("stsb", args.data_dir)
    model = torchslim.build_model("hf:minilm").eval()
    for name in args.methods.split(","):
        key, fields = METHODS[name]
        entry = get_method(*key.split("."))
        session = Session(task=task)
        _Timed.seconds = 0.0
        torch.manual_seed(0)
        t = time.perf_counter()
        entry.handler(copy.deepcopy(model), entry.config_cls.from_dict(fields), session)
        total = time.perf_counter() - t
        row = session.info["metrics"]
        rows = row["quantized_layers"]
        out = [r for r in rows if r["sqnr_db"] is not None]
        worst = min(out, key=lambda r: r["sqnr_db"])
        print(json.dumps({
            "method": name, "scheme": rows[0]["scheme"], "layers": len(rows), "measured_on": row["quantized_layers_input"],
            "sqnr_db_median": round(statistics.median(r["sqnr_db"] for r in out), 2),
            "sqnr_db_min": worst["sqnr_db"], "sqnr_db_min_layer": worst["name"],
            "weight_sqnr_db_median": round(statistics.median(r["weight_sqnr_db"] for r in rows), 2),
            "handler_s": round(total, 2), "measurement_s": round(_Timed.seconds, 2),
            "per_layer": {r["name"]: r["sqnr_db"] for r in rows}}), flush=True)
        if args.plot_dir:
            run = Path(args.plot_dir) / name
            run.mkdir(parents=True, exist_ok=True)
            metrics = {"steps": [{"name": "baseline"}, {"name": name, "verb": "quantize", **row}]}
            (run / "metrics.json").write_text(json.dumps(metrics))
            from torchslim.report import make_plots
            make_plots(metrics, run / "plots")


if __name__ == "__main__":
    main()
