"""Low-bit MiniLM: all-MiniLM-L6-v2 (hf:minilm) on STS-B at 4 and 3 bits, RTN vs GPTQ.

Run (about 8 min of CPU at one thread for the defaults):

    python bench/lowbit_minilm.py --data-dir ../shared/data [--bits 4,3] [--methods rtn,gptq]
        [--group-size 128] [--embedding-bits 4] [--samples 128] [--smooth 0.5] [--in-order]

Every method quantizes the encoder's and pooler's Linear layers (``re:.*``) at ``--bits`` with
one scale per ``--group-size`` inputs (symmetric), and the three embedding tables
(``embeddings.word_embeddings``, ``position_embeddings``, ``token_type_embeddings``, named
exactly) by round-to-nearest at ``--embedding-bits`` (default: the same bits; one scale per
``--group-size`` values of a row): the word table is half of MiniLM's weights, so without it no
model is under 50% of fp32. LayerNorms and biases stay float32. Methods:

- ``rtn``: ``quantize.linear`` (round to nearest) on the Linear layers;
- ``gptq``: ``quantize.gptq`` on the Linear layers, ``--samples`` STS-B training pairs (both
  sentences) as calibration data, ``act_order`` on (``--in-order``: off);
- ``kmeans``: ``quantize.kmeans`` on the Linear layers, one codebook of 2**bits centroids per
  layer (no per-group scales, so no scale overhead), no fine-tuning;
- ``rtn-smooth``, ``gptq-smooth``: the same after SmoothQuant with alpha ``--smooth``.

Another method plugs in by adding ``name: function(bits, args) -> list of step configs`` to
``METHODS``. Prints one JSON line per model: test Spearman, artifact bytes
(``torchslim.save``) and their ratio to fp32, the cosine of 512 test sentences' embeddings to
fp32's (mean, min), the wall time of the quantization.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

import torchslim
from torchslim.quantize import GPTQConfig, KMeansQuantConfig, LinearQuantConfig
from torchslim.session import Session

EMBEDDINGS = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")


def _embeddings(bits: int, args) -> LinearQuantConfig:
    return LinearQuantConfig(bits=args.embedding_bits or bits, granularity="group", group_size=args.group_size,
                             targets=EMBEDDINGS)


def _rtn(bits: int, args, smooth: float | None = None) -> list:
    return [_embeddings(bits, args),
            LinearQuantConfig(bits=bits, granularity="group", group_size=args.group_size, smooth=smooth,
                              calibration={"samples": args.samples})]


def _gptq(bits: int, args, smooth: float | None = None) -> list:
    return [_embeddings(bits, args),
            GPTQConfig(bits=bits, granularity="group", group_size=args.group_size, act_order=not args.in_order,
                       smooth=smooth, calibration={"samples": args.samples})]


def _kmeans(bits: int, args) -> list:
    # one codebook of 2**bits centroids per layer (Deep Compression's weight sharing), no
    # fine-tuning: post-training, like the other columns
    return [_embeddings(bits, args), KMeansQuantConfig(bits=bits, targets=("re:.*",))]


#: method name -> the quantization steps at ``bits`` (applied in order)
METHODS = {
    "rtn": _rtn,
    "gptq": _gptq,
    "kmeans": _kmeans,
    "rtn-smooth": lambda bits, args: _rtn(bits, args, args.smooth),
    "gptq-smooth": lambda bits, args: _gptq(bits, args, args.smooth),
}


@torch.no_grad()
def embeddings(model, task, batches) -> torch.Tensor:
    """Sentence embeddings (2 * pairs, D) of ``batches`` (both sentences of each pair)."""
    return torch.cat([task.forward(model, b).flatten(0, 1) for b in batches])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--methods", default="rtn,gptq", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--embedding-bits", type=int, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--smooth", type=float, default=0.5)
    ap.add_argument("--in-order", action="store_true", help="GPTQ without act_order (columns in order)")
    ap.add_argument("--no-fp32", action="store_true", help="skip measuring the fp32 model again")
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    task = torchslim.build_task("stsb", data_dir=args.data_dir)
    base = torchslim.build_model("hf:minilm").eval()
    probe = Session(task=task).calibration_batches(256, split="test", seed=1)   # 512 test sentences
    ref = embeddings(base, task, probe)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_bytes = torchslim.save(base, Path(tmp) / "fp32")
        if not args.no_fp32:
            print(json.dumps({"model": "fp32", "spearman": round(task.evaluate(base, "test"), 4),
                              "bytes": fp32_bytes, "size_ratio": 1.0}), flush=True)
        for bits in (int(b) for b in args.bits.split(",")):
            for name in methods:
                t0 = time.perf_counter()
                model = base
                for step in METHODS[name](bits, args):
                    model = torchslim.apply(model, step, task=task)
                quant_s = time.perf_counter() - t0
                size = torchslim.save(model, Path(tmp) / f"{name}-{bits}")
                back = torchslim.load(Path(tmp) / f"{name}-{bits}").eval()   # what a user gets
                cos = torch.nn.functional.cosine_similarity(embeddings(back, task, probe), ref, dim=-1)
                print(json.dumps({"model": name, "bits": bits, "group_size": args.group_size,
                                  "embedding_bits": args.embedding_bits or bits,
                                  "spearman": round(task.evaluate(back, "test"), 4),
                                  "cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
                                  "bytes": size,
                                  "size_ratio": round(size / fp32_bytes, 4), "quantize_s": round(quant_s, 1)}),
                      flush=True)


if __name__ == "__main__":
    main()
