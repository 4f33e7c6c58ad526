"""OpenMP wait policy and thread count: eager latency of digits-cnn in fresh processes.

Run (about a minute):

    python bench/bench_wait_policy.py [--rounds 2]

torchslim sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless the user set one), so idle
OpenMP workers sleep instead of spinning: on a busy 2-core machine spinning workers were seen to
turn a 0.08 ms forward into 36-60 ms. This script shows the price: each (policy, threads) pair
runs in a fresh process (the policy is read once, when torch loads), interleaved over rounds,
and prints the median, IQR and CPU time per forward pass at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch, torchslim
from torchslim.measure import measure_runtime_latency
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
m = torchslim.build_model("zoo:digits-cnn").eval()
r = measure_runtime_latency(m, torchslim.build_task("digits"), "eager", (1, 32), min_run_time=0.3)
print(json.dumps({k: v.to_dict() for k, v in r.items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print("| round | OMP_WAIT_POLICY | threads | bs1 median ms | bs1 IQR | bs1 CPU ms | bs32 median ms | bs32 IQR | bs32 CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rnd in range(1, args.rounds + 1):
        for policy in ("PASSIVE", "ACTIVE"):
            for threads in (1, 2):
                env = {**os.environ, "OMP_WAIT_POLICY": policy}
                out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                a, b = r["1"], r["32"]
                print(f"| {rnd} | {policy} | {threads} | {a['median_ms']} | {a['iqr_ms']} | {a['cpu_ms']} | "
                      f"{b['median_ms']} | {b['iqr_ms']} | {b['cpu_ms']} |", flush=True)


if __name__ == "__main__":
    main()
