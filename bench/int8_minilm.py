"""int8 all-MiniLM-L6-v2 on STS-B: torchslim against torch.ao, torchao and ONNX Runtime, one run.

    OMP_NUM_THREADS=1 python bench/int8_minilm.py [--out int8_minilm.json] [--threads 1 2] [--rounds 3]

(``TORCHSLIM_DATA`` must hold ``stsbenchmark/``; about 8 minutes on a quiet 2-core machine, most
of it ``torch.compile``.) Every model is built in this one process and timed interleaved
(``torch.utils.benchmark`` ``blocked_autorange``, 0.3 s, in turns, ``--rounds`` times, median of
the medians), so a slow phase of a shared machine hits all alike:

- ``fp32 eager``: the bundled model (``hf:minilm``) under ``inference_mode``;
- ``torch.ao dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` on its Linear layers
  (default qconfig: per-tensor weights, per-batch activations with ``reduce_range``);
- ``torchao int8`` / ``torchao int8 + compile``: ``Int8DynamicActivationInt8WeightConfig``
  (per-token activations, per-channel weights), eager and ``torch.compile``\\ d. The eager one
  multiplies with ``torch._int_mm``, which is 20-50x slower than the fp32 matmul on this AVX2
  CPU: it is not timed, and its cosine is taken on 64 sentences without the Spearman (an STS-B
  pass would take half an hour); the compiled model is timed only (compiling every evaluation
  shape would take many minutes), its outputs being the eager model's up to kernel rounding;
- ``ORT fp32`` and ``ORT int8``: the model exported to ONNX (opset 18, TorchScript exporter) and
  ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`` on it
  (which quantizes the embedding tables' Gather too), run by a default CPU session
  (spinning off);
- ``torchslim int8``: ``quantize.linear`` with ``activations: dynamic``, ``bits: 7`` (so AVX2's
  int16 pair sums cannot saturate with 8-bit activations), every Linear plus the word, position
  and token-type embeddings, saved with ``torchslim.save`` and timed as ``torchslim.load`` gives it
  back (the Int8Linear kernels each layer picked when quantized; ``kernels`` in the output);
- ``torchslim int8 static``: the same with ``activations: static`` (one input range per layer from
  128 training pairs, min/max).

Latency: one forward pass of the encoder (token ids + mask -> token states) at batch 1 (the first
test sentence, its own length) and batch 32 (32 test sentences padded to the longest). Fidelity:
cosine of each mean-pooled sentence embedding to fp32's over the first ``--sentences`` test
sentences (mean, min), and the STS-B test Spearman (x100). Size: the bytes on disk of what each
runtime loads (fp32: the torchslim artifact of the float model; torch.ao / torchao: their
``state_dict`` saved with ``torch.save``; ONNX files; the torchslim int8 artifact).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import torchslim
from torchslim.api import apply_
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.onnx_io import export_onnx
from torchslim.specs.stsb import _pad, mean_pool
from torchslim.specs.tasks import build_task

log = logging.getLogger("int8_minilm")
#: eager torchao int8 multiplies with ``torch._int_mm``, 20-50x slower than the fp32 matmul on this
#: AVX2 CPU: not timed, and its fidelity is taken on 64 sentences (the compiled model is timed)
SLOW = ("torchao int8",)
EMBEDDINGS = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")


class OrtModel(nn.Module):
    """An ONNX Runtime session behind ``model(input_ids, attention_mask) -> token states``."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path, self.threads = path, threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        return torch.from_numpy(self.sess.run(None, feed)[0])


def tokens(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def saved_bytes(model: nn.Module, path: Path) -> int:
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def build(work: Path, task, fp32: nn.Module, b1: tuple, b32: tuple) -> tuple[dict, dict, dict]:
    """The models to compare, their sizes on disk and notes (what each runs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    models, size, note = {"fp32 eager": fp32}, {}, {}
    torchslim.save(fp32, work / "fp32")
    size["fp32 eager"] = dir_bytes(work / "fp32")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    models["torch.ao dynamic int8"], size["torch.ao dynamic int8"] = ao, saved_bytes(ao, work / "ao.pt")

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tao = copy.deepcopy(fp32)
        quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        models["torchao int8"], size["torchao int8"] = tao, saved_bytes(tao, work / "torchao.pt")
        t0 = time.perf_counter()
        compiled = torch.compile(tao)
        with torch.inference_mode():
            compiled(*b1), compiled(*b32)
        models["torchao int8 + compile"], size["torchao int8 + compile"] = compiled, size["torchao int8"]
        note["torchao int8 + compile"] = f"compiled for the two timed shapes in {time.perf_counter() - t0:.0f} s"
        log.info("torchao: %s", note["torchao int8 + compile"])
    except ImportError as exc:
        note["torchao int8"] = f"not run: {exc} (pip install 'torchslim[torchao]')"

    # NOTE: on main from 6172aae on, quantize_dynamic quantizes only part of this export's MatMuls
    # (54.7 MB, 60% of fp32, with either exporter); BENCHMARKS' table used the export before it (23 MB)
    export_onnx(fp32, b1, work / "fp32.onnx", input_names=("input_ids", "attention_mask"), variable_length=True,
                exporter="torchscript")
    logging.getLogger("root").setLevel(logging.ERROR)   # ORT's quantizer suggests pre-processing on every call
    quantize_dynamic(str(work / "fp32.onnx"), str(work / "int8.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    for name, f in (("ORT fp32", "fp32.onnx"), ("ORT int8", "int8.onnx")):
        models[name], size[name] = OrtModel(work / f, 1), (work / f).stat().st_size

    for name, activations in (("torchslim int8", "dynamic"), ("torchslim int8 static", "static")):
        q = copy.deepcopy(fp32)
        t0 = time.perf_counter()
        config = LinearQuantConfig(bits=7, activations=activations, targets=("re:.*", *EMBEDDINGS))
        apply_(q, config, task=task)
        torchslim.save(q, work / name)
        loaded = torchslim.load(work / name).eval()
        kernels: dict[str, int] = {}
        for m in loaded.modules():
            if hasattr(m, "kernel"):
                kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
        models[name], size[name] = loaded, dir_bytes(work / name)
        note[name] = (f"quantized in {time.perf_counter() - t0:.0f} s; Int8Linear kernels {kernels}; "
                      f"quantized engine {torch.backends.quantized.engine}")
        log.info("%s: %s", name, note[name])
    return models, size, note


def fidelity(models: dict, task, sentences: list[list[int]], pad: int) -> dict:
    """Cosine to fp32 (mean, min) over ``sentences`` and the STS-B test Spearman x100; for the
    models in :data:`SLOW` the cosine over the first 64 sentences only, no Spearman."""
    batches = [_pad(sentences[i:i + 32], max(map(len, sentences[i:i + 32])), pad) for i in range(0, len(sentences), 32)]
    out = {}
    with torch.inference_mode():
        ref = torch.cat([mean_pool(tokens(models["fp32 eager"](*b)), b[1]) for b in batches])
        for name, m in models.items():
            if name.endswith("+ compile"):
                continue
            some = batches[:2] if name in SLOW else batches
            emb = torch.cat([mean_pool(tokens(m(*b)), b[1]) for b in some])
            cos = F.cosine_similarity(emb, ref[:len(emb)], dim=-1)
            out[name] = {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5),
                         "sentences": len(emb),
                         "spearman": None if name in SLOW else round(100 * task.evaluate(m, "test"), 2)}
            log.info("fidelity %s: %s", name, out[name])
    return out


def latency(models: dict, inputs: dict, threads: int, rounds: int) -> dict:
    """``name -> {batch: median ms}`` at ``threads`` intra-op threads, models in turns."""
    torch.set_num_threads(threads)
    for m in models.values():
        if isinstance(m, OrtModel) and m.threads != threads:
            m.__init__(m.path, threads)
    models = {n: m for n, m in models.items() if n not in SLOW}
    per = {(n, b): [] for n in models for b in inputs}
    for _ in range(rounds):
        for name, m in models.items():
            for b, x in inputs.items():
                t = benchmark.Timer("m(*x)", globals={"m": m, "x": x}, num_threads=threads)
                with torch.inference_mode():
                    per[(name, b)].append(t.blocked_autorange(min_run_time=0.3).median * 1e3)
    out = {n: {b: round(statistics.median(per[(n, b)]), 3) for b in inputs} for n in models}
    log.info("latency at %d threads: %s", threads, out)
    return out


def stsb_inputs(n: int) -> tuple:
    """``(task, sentences, pad id, inputs)``: the STS-B task, the first ``n`` test sentences
    (token ids) and the timed inputs ``{"1": (ids, mask) of the first sentence, "32": the first
    32 padded to the longest}``."""
    task = build_task("stsb")
    test = task.split("test")
    sentences = [test[i][0] for i in range(len(test))][:n]
    pad = task._pad_id
    inputs = {"1": _pad(sentences[:1], len(sentences[0]), pad),
              "32": _pad(sentences[:32], max(map(len, sentences[:32])), pad)}
    return task, sentences, pad, inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=512, help="test sentences for the cosine")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    task, sentences, pad, inputs = stsb_inputs(args.sentences)
    fp32 = torchslim.build_model("hf:minilm").eval()
    with tempfile.TemporaryDirectory() as tmp:
        models, size, note = build(Path(tmp), task, fp32, inputs["1"], inputs["32"])
        fid = fidelity(models, task, sentences, pad)
        lat = {t: latency(models, inputs, t, args.rounds) for t in args.threads}
    result = {"threads": args.threads, "shapes": {b: list(x[0].shape) for b, x in inputs.items()},
              "size_bytes": size, "fidelity": fid, "latency_ms": lat, "notes": note}
    print("| model | size MB (% fp32) | cos mean / min | Spearman | " +
          " | ".join(f"{t} thr bs{b} ms (x fp32)" for t in args.threads for b in inputs) + " |")
    print("|---" * (4 + len(args.threads) * len(inputs)) + "|")
    for name in models:
        f = fid.get(name, fid.get(name.removesuffix(" + compile"), {}))
        cells = [f"{lat[t][name][b]:.2f} ({lat[t][name][b] / lat[t]['fp32 eager'][b]:.2f})" if name in lat[t] else "-"
                 for t in args.threads for b in inputs]
        print(f"| {name} | {size[name] / 1e6:.1f} ({100 * size[name] / size['fp32 eager']:.0f}%) | "
              f"{f.get('cos_mean', '-')} / {f.get('cos_min', '-')} | {f.get('spearman', '-')} | " + " | ".join(cells) + " |")
    for k, v in note.items():
        print(f"- {k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
