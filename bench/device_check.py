"""CUDA paths of the core, for a machine with a GPU: ``PYTHONPATH=src python bench/device_check.py OUT``.

Checks (each prints one line, and the script exits non-zero on the first failure):
1. a recipe with ``device: cuda`` trains, prunes while distilling from the baseline, quantizes
   and measures on the GPU; metrics.json says ``cuda:0``; the artifact reloads on the CPU with
   the same accuracy;
2. the session's calibration batches, capture and sequential runner work on a CUDA model;
3. a bf16 model on the GPU saves and reloads as bf16 with identical outputs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import torchslim
from torchslim.session import Session


def main(out: Path) -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    recipe = {
        "model": {"spec": "zoo:digits-cnn", "args": {"channels": [16, 32], "hidden": 64}},
        "task": "digits", "device": "cuda",
        "train": {"optimizer": "adamw", "epochs": 6, "lr": 0.003, "loggers": []},
        "steps": [{"prune": {"method": "magnitude", "sparsity": 0.7, "finetune": {
                       "optimizer": "adamw", "epochs": 2, "lr": 0.001, "loggers": [],
                       "distill": {"teacher": "baseline", "temperature": 2.0, "alpha": 0.7}}}},
                  {"quantize": {"method": "linear", "bits": 4, "symmetric": False}}],
        "measure": {"batch_sizes": [1, 32]},
    }
    m = torchslim.compress(recipe, work / "run")
    rows = [(s["name"], s["metric"]["value"], s["size_bytes"], s["nonzero_params"], s["latency_ms"])
            for s in m["steps"]]
    assert m["environment"]["device"] == "cuda:0", m["environment"]
    back = torchslim.load(work / "run" / "model")
    acc = torchslim.build_task("digits").evaluate(back)
    assert abs(acc - m["steps"][-1]["metric"]["value"]) < 1e-6, (acc, m["steps"][-1])
    print("1 compress on cuda:", json.dumps(rows), "reloaded on cpu:", acc, flush=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=1))

    model = torchslim.build_model("zoo:digits-cnn").cuda()
    s = Session(task=torchslim.build_task("digits"), device=torch.device("cuda"))
    batches = s.calibration_batches(64, batch_size=32)
    assert batches[0][0].device.type == "cuda"
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    with s.capture(model, names[:1], outputs=True, grads=True) as got:
        s.task.loss(model(batches[0][0]), batches[0]).backward()
    assert got[names[0]]["grads"][0].device.type == "cuda"
    seen = []
    s.sequential(model, names, batches, lambda name, mod, inputs: seen.append((name, len(inputs))))
    assert seen == [(n, 2) for n in names], seen
    print("2 session on cuda: calibration, capture, sequential ok", flush=True)

    half = torchslim.build_model("zoo:digits-cnn").to("cuda", torch.bfloat16).eval()
    torchslim.save(half, work / "bf16")
    again = torchslim.load(work / "bf16").to("cuda")
    x = torch.randn(4, 1, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(x), half(x))
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    print("3 bf16 on cuda: save/load identical", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "device-out"))
