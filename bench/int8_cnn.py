"""Static int8 CNNs (resnet18, mobilenet_v2): torchslim against PT2E + inductor and ONNX Runtime, one run.

    OMP_NUM_THREADS=1 python bench/int8_cnn.py [--out int8_cnn.json] [--models resnet18 mobilenet_v2]
                                               [--rounds 3] [--no-compile]

torchvision models with random weights (seed 0; the ``shape:3x224x224`` setting: latency and
fidelity only, no accuracy) whose BatchNorm statistics are measured on the 64 calibration images
(``set_batchnorm_statistics``), random N(0, 1) images. Every model is built in this one process and
timed interleaved (``_timing.latency``: ``blocked_autorange`` 0.3 s, in turns, ``--rounds`` times,
median of the medians) at batch 1 and 16, one thread, so a slow phase of a shared machine hits all
alike. Latency is reported as a ratio to fp32 eager. Fidelity: cosine of each image's output
(1000 logits) to fp32 eager's over the batch-16 images (mean, min), plain and centred (both
minus fp32's batch mean; see ``cosine``).

- ``fp32 eager`` and ``fp32 folded`` (``fold.batchnorm``: BatchNorm folded into the convolutions);
- ``torchslim int8``: ``fold.batchnorm`` then ``quantize.linear`` with ``activations: static``
  (symmetric per-channel 8-bit codes, input ranges from 64 calibration images, min/max), every
  Conv2d an ``Int8Conv2d`` (oneDNN ``qconv2d_pointwise``, float output) and the classifier an
  ``Int8Linear``, ``kernel: auto`` (each layer keeps int8 or float compute by timing it at batch
  1 and 32), saved and timed as ``torchslim.load`` gives it back; ``torchslim int8 (all int8)``
  the same with ``kernel: int8`` everywhere;
- ``per-layer fbgemm int8``: candidate measured and not kept: each folded Conv2d run by
  ``quantize_per_tensor -> quantized.conv2d (x86 engine) -> dequantize`` with calibrated input and
  output scales (the output is requantized to uint8, so the output range must be calibrated too);
- ``PT2E int8 + compile``: ``torchao.quantization.pt2e`` ``prepare_pt2e`` / ``convert_pt2e`` with
  ``X86InductorQuantizer`` (default static config) on the exported model (resnet: see
  ``untie_relus``), calibrated on the same
  images, then ``torch.compile`` with ``torch._inductor.config.freezing = True`` (inductor lowers
  the q/dq patterns onto oneDNN int8 kernels only with frozen weights); compiled once per timed
  batch size; ``fp32 compile`` its float peer (frozen too); ``torchslim int8 + compile``: the
  loaded torchslim int8 model under ``torch.compile`` (frozen);
- ``ORT fp32`` and ``ORT int8``: the folded model exported to ONNX (TorchScript exporter, opset 18),
  ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MinMax on the calibration images through a ``CalibrationDataReader``), default
  CPU session, one intra-op thread, spinning off.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.methods.fold.batchnorm import BatchNormFoldConfig
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.onnx_io import export_onnx
from torchslim.specs.tasks import ShapeTask

sys.path.insert(0, str(Path(__file__).parent))
from _timing import latency  # noqa: E402

log = logging.getLogger("int8_cnn")
SHAPE = (3, 224, 224)
BATCHES = (1, 16)


class CalibratedShapeTask(ShapeTask):
    """``shape:3x224x224`` with a ``train`` split of random N(0, 1) images (dummy labels), so that
    ``activations: static`` has calibration batches."""

    def __init__(self, n: int) -> None:
        super().__init__("shape:3x224x224", SHAPE, tokens=False)
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, *SHAPE, generator=g)

    def split(self, name: str):
        return torch.utils.data.TensorDataset(self.images, torch.zeros(len(self.images), dtype=torch.long))


class OrtModel(nn.Module):
    """An ONNX Runtime session behind ``model(images) -> logits``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {"input": x.numpy()})[0])


class FbgemmConv(nn.Module):
    """A Conv2d on PyTorch's quantized x86 engine: uint8 input and output with calibrated scales."""

    def __init__(self, conv: nn.Conv2d, in_range: tuple[float, float], out_range: tuple[float, float]) -> None:
        super().__init__()
        from torchslim.methods.quantize import primitives as P

        w = conv.weight.detach()
        s_w = (w.abs().amax((1, 2, 3)) / 127).clamp_min(1e-12).double()
        codes = torch.round(w / s_w.float()[:, None, None, None]).to(torch.int8)
        qw = torch._make_per_channel_quantized_tensor(codes, s_w, torch.zeros(len(s_w), dtype=torch.long), 0)
        self.packed = torch.ops.quantized.conv2d_prepack(qw, conv.bias.detach().float(), list(conv.stride),
                                                         list(conv.padding), list(conv.dilation), conv.groups)
        (s_in, z_in), (s_out, z_out) = (P.activation_qparams(torch.tensor(lo), torch.tensor(hi), 7)
                                        for lo, hi in (in_range, out_range))
        self.s_in, self.z_in, self.s_out, self.z_out = float(s_in), int(z_in), float(s_out), int(z_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx = torch.quantize_per_tensor(x, self.s_in, self.z_in, torch.quint8)
        return torch.ops.quantized.conv2d(qx, self.packed, self.s_out, self.z_out).dequantize()


def ranges(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, tuple]:
    """``name -> ((in_min, in_max), (out_min, out_max))`` over ``images``."""
    seen: dict[str, list[float]] = {n: [0.0, 0.0, 0.0, 0.0] for n in names}

    def hook(n):
        def fn(mod, args, out):
            r = seen[n]
            r[:] = [min(r[0], float(args[0].min())), max(r[1], float(args[0].max())),
                    min(r[2], float(out.min())), max(r[3], float(out.max()))]
        return fn
    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.inference_mode():
        for chunk in images.split(16):
            model(chunk)
    for h in hs:
        h.remove()
    return {n: ((r[0], r[1]), (r[2], r[3])) for n, r in seen.items()}


def fbgemm_model(folded: nn.Module, images: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(folded)
    names = [n for n, c in m.named_modules() if type(c) is nn.Conv2d]
    for n, (rin, rout) in ranges(m, names, images).items():   # timed only, never saved: a plain setattr
        parent, _, attr = n.rpartition(".")
        setattr(m.get_submodule(parent), attr, FbgemmConv(m.get_submodule(n), rin, rout))
    return m


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock.forward`` with the second ReLU a module of its own."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    return self.relu_out(out + identity)


def untie_relus(model: nn.Module) -> nn.Module:
    """Each torchvision ``BasicBlock`` calls its one ``relu`` twice; X86InductorQuantizer groups
    nodes by the module that made them and refuses a group with two outputs ("Input partition
    has more than one output node"), so the second call gets a ReLU of its own (same function)."""
    from torchvision.models.resnet import BasicBlock

    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.relu_out = nn.ReLU()
            block.forward = types.MethodType(_basic_block_forward, block)
    return model


def pt2e_model(fp32: nn.Module, images: torch.Tensor, batches: tuple[int, ...]) -> tuple[dict, float]:
    """PT2E + X86InductorQuantizer, compiled: ``batch -> compiled module`` and the compile seconds."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    out, t0 = {}, time.perf_counter()
    for bs in batches:
        x = images[:bs]
        exported = torch.export.export(untie_relus(copy.deepcopy(fp32)).eval(), (x,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for chunk in images.split(bs):   # the exported graph has the batch size fixed
                prepared(chunk)
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted)
        with torch.inference_mode():
            compiled(x)
        out[bs] = compiled
    return out, time.perf_counter() - t0


def compiled(model: nn.Module, images: torch.Tensor, batches: tuple[int, ...]) -> dict:
    """``batch -> torch.compile(model)`` run once at that batch size (the compiled models share
    ``model``, which is not copied: a loaded int8 model holds packed weights deepcopy cannot copy)."""
    out = {}
    for bs in batches:
        c = torch.compile(model.eval())
        with torch.inference_mode():
            c(images[:bs])
        out[bs] = c
    return out


def ort_models(folded: nn.Module, images: torch.Tensor, work: Path) -> dict[str, nn.Module]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(images.split(1))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x.numpy()}

    export_onnx(folded, (images[:1],), work / "fp32.onnx", input_names=("input",), exporter="torchscript")
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)   # ORT's quantizer suggests pre-processing on every call
    quantize_static(str(work / "fp32.onnx"), str(work / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    root.setLevel(level)
    return {"ORT fp32": OrtModel(work / "fp32.onnx"), "ORT int8": OrtModel(work / "int8.onnx")}


def torchslim_int8(folded: nn.Module, task: CalibratedShapeTask, kernel: str, work: Path) -> tuple[nn.Module, dict]:
    q = torchslim.apply(copy.deepcopy(folded), LinearQuantConfig(activations="static", kernel=kernel,
                                                                 calibration={"samples": len(task.images)}),
                        task=task)
    torchslim.save(q, work / f"ts-{kernel}")
    back = torchslim.load(work / f"ts-{kernel}").eval()
    kinds: dict[str, int] = {}
    for m in back.modules():
        if hasattr(m, "kernel"):
            key = f"{type(m).__name__}:{m.kernel}"
            kinds[key] = kinds.get(key, 0) + 1
    return back, kinds


def set_batchnorm_statistics(model: nn.Module, images: torch.Tensor) -> None:
    """BatchNorm running statistics = the mean and variance of ``images``' activations (a random
    init keeps mean 0 / variance 1, under which mobilenet_v2's activations shrink to ~1e-8 and its
    logits are the same for every image: no test of fidelity), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None              # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
    model.eval()


def cosine(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float, float]:
    """Cosine of each image's output to fp32's (mean, min), then the same on the outputs minus
    fp32's batch mean: a random-init network gives every image nearly the same logits, which
    makes the plain cosine blind to errors in what differs between images."""
    y, ref = y.double().flatten(1), ref.double().flatten(1)
    c = F.cosine_similarity(y, ref, dim=1)
    centre = ref.mean(0, keepdim=True)
    cc = F.cosine_similarity(y - centre, ref - centre, dim=1)
    return float(c.mean()), float(c.min()), float(cc.mean()), float(cc.min())


def run(name: str, args, work: Path) -> dict:
    torch.manual_seed(0)
    fp32 = torchslim.build_model(f"torchvision:{name}")   # random init (seeded above)
    task = CalibratedShapeTask(64)
    images = task.images
    set_batchnorm_statistics(fp32, images)
    xs = {bs: torch.randn(bs, *SHAPE, generator=torch.Generator().manual_seed(2)) for bs in BATCHES}
    folded = torchslim.apply(copy.deepcopy(fp32), BatchNormFoldConfig(), task=task).eval()
    models: dict[str, nn.Module] = {"fp32 eager": fp32, "fp32 folded": folded}
    notes: dict[str, str] = {}
    t0 = time.perf_counter()
    models["torchslim int8"], kinds = torchslim_int8(folded, task, "auto", work)
    notes["torchslim int8"] = f"kernels {kinds}; quantized + timed in {time.perf_counter() - t0:.0f} s"
    models["torchslim int8 (all int8)"], _ = torchslim_int8(folded, task, "int8", work)
    models["per-layer fbgemm int8"] = fbgemm_model(folded, images)
    models.update(ort_models(folded, images, work))
    per_batch: dict[int, dict[str, nn.Module]] = {bs: dict(models) for bs in BATCHES}
    if args.compile:
        int8 = models["torchslim int8"]
        for label, build in (("fp32 compile", lambda: (compiled(copy.deepcopy(fp32), images, BATCHES), None)),
                             ("PT2E int8 + compile", lambda: pt2e_model(fp32, images, BATCHES)),
                             ("torchslim int8 + compile", lambda: (compiled(int8, images, BATCHES), None))):
            try:
                t0 = time.perf_counter()
                by_bs, _ = build()
                notes[label] = f"compiled for the two batch sizes in {time.perf_counter() - t0:.0f} s"
                for bs in BATCHES:
                    per_batch[bs][label] = by_bs[bs]
            except Exception as exc:   # a path this torch cannot run is reported, not fatal
                notes[label] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.info("%s: %s", label, notes[label])
    result: dict = {"model": name, "notes": notes, "latency_ms": {}, "ratio_to_fp32": {}, "cosine": {}}
    with torch.inference_mode():
        ref = fp32(xs[16])
        for label, m in per_batch[16].items():
            result["cosine"][label] = [round(v, 5) for v in cosine(m(xs[16]), ref)]
    for bs in BATCHES:
        ms = latency(per_batch[bs], xs[bs], args.rounds)
        result["latency_ms"][bs] = {k: round(v, 2) for k, v in ms.items()}
        result["ratio_to_fp32"][bs] = {k: round(v / ms["fp32 eager"], 3) for k, v in ms.items()}
        log.info("%s batch %d: %s", name, bs, result["ratio_to_fp32"][bs])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="int8_cnn.json")
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # inductor lowers PT2E's quantize/dequantize + conv patterns onto oneDNN int8 kernels (and
    # prepacks fp32 weights) only with frozen weights; without, both compiled rows run float ops
    torch._inductor.config.freezing = True
    results = {"threads": 1, "torch": torch.__version__, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results["models"].append(run(name, args, Path(tmp)))
            Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results["models"]:
        print(f"\n{r['model']}  (ratio to fp32 eager; cosine to fp32 mean/min, centred mean/min, batch 16)")
        for label in r["ratio_to_fp32"][16]:
            print(f"  {label:28s} b1 {r['ratio_to_fp32'][1][label]:6.3f} ({r['latency_ms'][1][label]:7.2f} ms)  "
                  f"b16 {r['ratio_to_fp32'][16][label]:6.3f} ({r['latency_ms'][16][label]:8.2f} ms)  "
                  f"cos {r['cosine'][label]}")
        print("  notes:", json.dumps(r["notes"]))


if __name__ == "__main__":
    main()
