"""Storage benchmark: bytes on disk of torchslim artifacts as the encodings pack them.

Run (about 10 seconds, no data needed):

    python bench/bench_storage.py [--out storage.json]

LeNet-300-100 (266,610 weights, random init: sizes do not depend on training) saved as a
torchslim artifact after round-to-nearest quantization at 8, 6, 4, 3 and 2 bits per channel, and
after 90% global magnitude pruning followed by int8 / int4, symmetric and affine. For each row:
the artifact's bytes (every file), the ratio to the int8 artifact, the logical parameter and
non-zero counts, and ``torch.save`` of the same model's state_dict for comparison (codes kept in
int8 tensors there).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import torch

import torchslim
from torchslim.measure import count_params
from torchslim.prune import MagnitudePruneConfig
from torchslim.quantize import LinearQuantConfig


def torch_save_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = torchslim.build_model("zoo:lenet-300-100").eval()
    pruned = torchslim.apply(dense, MagnitudePruneConfig(sparsity=0.9))
    models = {"float32 dense": dense}
    for bits in (8, 6, 4, 3, 2):
        models[f"int{bits} per-channel symmetric"] = torchslim.apply(dense, LinearQuantConfig(bits=bits))
    models["90% pruned float32"] = pruned
    for bits in (8, 4):
        for sym in (True, False):
            name = f"90% pruned + int{bits} {'symmetric' if sym else 'affine'}"
            models[name] = torchslim.apply(pruned, LinearQuantConfig(bits=bits, symmetric=sym))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(models.items()):
            size = torchslim.save(model, Path(tmp) / str(i))
            params, nonzero = count_params(model)
            rows.append({"name": name, "bytes": size, "params": params, "nonzero": nonzero,
                         "torch_save_bytes": torch_save_bytes(model)})
    int8 = next(r["bytes"] for r in rows if r["name"].startswith("int8"))
    print(f"| model | artifact bytes | x int8 artifact | params | non-zero | torch.save bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["vs_int8"] = round(r["bytes"] / int8, 3)
        print(f"| {r['name']} | {r['bytes']} | {r['vs_int8']:.3f} | {r['params']} | {r['nonzero']} | "
              f"{r['torch_save_bytes']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
