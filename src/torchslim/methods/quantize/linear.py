"""Round-to-nearest linear weight quantization (``quantize: {method: linear}``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear  # the out_proj nn.MultiheadAttention builds

from ...config import MethodConfig, option
from ...errors import RecipeError, UserError
from ...edits import replace_module
from ...modules import select_modules
from ...registry import register_method
from ...train.config import TrainConfig
from . import primitives as P
from ...layers.int8 import int8_engine, onednn_conv_available, symmetric_padding
from ...layers.int4 import GROUP_SIZES
from .int8 import (AUTO_BATCHES, choose_conv_kernel, choose_kernel, input_rows, input_shapes, observe_ranges,
                   summary)
from .int4 import int4_applies, int4_plan, int4_refusals
from ...layers import (Int4Linear, Int8Conv2d, Int8Linear, QuantConv1d, QuantConv2d, QuantConv3d, QuantEmbedding,
                       QuantLinear, QuantMultiheadAttention)
from .calibration import CalibrationConfig, calibration_batches, calibration_option, require_data, smooth_option
from .layer_error import FloatReference
from .smooth import SMOOTH_NEEDS, smooth_model

log = logging.getLogger(__name__)

#: float class -> its quantized layer; the first match wins (a subclass before its base)
QUANTIZED = (
    (QuantMultiheadAttention, None),            # already quantized: left as it is
    (nn.MultiheadAttention, QuantMultiheadAttention),
    (nn.Linear, QuantLinear),
    (nn.Conv1d, QuantConv1d),
    (nn.Conv2d, QuantConv2d),
    (nn.Conv3d, QuantConv3d),
    (nn.Embedding, QuantEmbedding),
)
#: the classes a ``re:`` target pattern picks; an Embedding is quantized when named exactly
PATTERN_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _quantized_class(module: nn.Module) -> type | None:
    return next((q for f, q in QUANTIZED if isinstance(module, f)), None)


def _refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be quantized by this method, or None."""
    if isinstance(module, QuantMultiheadAttention):
        return "it is quantized already"
    if _quantized_class(module) is None:
        return ("no quantized layer exists for this class (quantizable: Linear, Conv1d, Conv2d, Conv3d, "
                "Embedding, MultiheadAttention)")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode {module.padding_mode!r} is not supported (quantized convolutions pad with zeros)"
    if getattr(module, "max_norm", None) is not None:
        return "max_norm renormalizes rows on lookup, which integer codes cannot follow; set max_norm=None"
    return None


def _weights(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight",
                                                                      "v_proj_weight"]
    return ["weight"]


@dataclass(frozen=True)
class LinearQuantConfig(MethodConfig):
    """Quantize layer weights to ``bits``-bit integer codes with float scales.

    Quantized: Linear, Conv1d/2d/3d (zero padding), nn.MultiheadAttention (its packed q/k/v
    input projection; its ``out_proj`` is a Linear of its own) and Embedding (one scale per row
    with ``channel``). ``re:`` patterns pick all of these except Embedding, which is quantized
    when named exactly; a named module of any other class (LSTM, ConvTranspose2d, a norm) is
    refused with an error naming it.

    ``observer`` picks the range each scale covers: ``minmax`` (every weight exact to half a
    step), ``percentile`` (clipped at ``percentile``: outliers saturate, the rest gets a finer
    step) or ``mse`` (the clip ratio with the least squared error in each scale group).

    ``activations: dynamic`` (a scale per token at run time) or ``static`` (a scale per layer: the
    min/max of its input over ``calibration.samples`` training examples) turns Linear layers into
    :class:`~torchslim.layers.Int8Linear`,
    which multiply int8 activations by int8 weights on PyTorch's x86/fbgemm integer kernels
    (``kernel``; the row's ``int8`` entry says which layers run what). ``static`` also turns
    Conv2d layers (symmetric codes, numeric or symmetric padding) into
    :class:`~torchslim.layers.Int8Conv2d` (oneDNN int8 convolution); a Conv2d named exactly in
    ``targets`` under ``dynamic`` is refused (no per-call scale for convolutions); the other
    classes keep weight-only codes. Use ``bits: 7`` on CPUs without VNNI (see ``Int8Linear``).

    Weight-only ``bits: 4``, ``granularity: group`` (group_size 32/64/128/256): ``kernel:
    int4pack`` runs Linear layers on PyTorch's CPU int4 kernel (:class:`~torchslim.layers.Int4Linear`:
    bfloat16 activations, the codes unpacked on the fly); ``auto`` times the whole model on it
    against the dequantized weight at batch 1 and 32 and keeps the kernel for inputs up to the rows
    of the largest batch size where it won (the row's ``int4`` entry).

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> q = torchslim.apply(m, LinearQuantConfig(bits=8))
    >>> q[1].weight_q.dtype
    torch.int8
    """

    bits: int = option(8, low=2, high=8, doc="bits per weight code")
    granularity: str = option("channel", choices=("tensor", "channel", "group"),
                              doc="one scale per tensor, output channel, or group of inputs")
    group_size: int = option(128, low=2, doc="inputs per scale for granularity: group")
    symmetric: bool = option(True, doc="symmetric (zero point 0) or affine")
    activations: str = option("none", choices=("none", "dynamic", "static"),
                              doc="none: weight-only (float compute); dynamic: int8 activations with a scale per "
                                  "token computed at run time; static: one scale per layer from calibration "
                                  "batches. dynamic/static run Linear layers on integer kernels (Int8Linear)")
    observer: str = option("minmax", choices=("minmax", "percentile", "mse"),
                           doc="the range each scale covers: min/max, clipped at a percentile, or the clip "
                               "with the least squared error per scale group")
    percentile: float = option(99.99, low=0.0, high=100.0, low_open=True,
                               doc="observer: percentile clips |w| (symmetric) or w (affine) at this percentile")
    kernel: str = option("auto", choices=("auto", "int8", "reference", "dequant", "int4pack"),
                         doc="activations dynamic/static: auto times the integer kernel against float compute "
                             "per layer at the batch-1 and batch-32 shapes and keeps the faster; int8 forces "
                             "the integer engine, reference its float emulation, dequant float compute. "
                             "Weight-only bits 4 group: int4pack runs Linear layers on the CPU int4 kernel "
                             "(bf16 activations); auto times the whole model on it against the dequantized "
                             "weight at batch 1 and 32 and uses it up to the rows where it won")
    targets: tuple[str, ...] = option(("re:.*",), doc="module names (Embedding too) or re: patterns (they pick "
                                                     "Linear, Conv1d/2d/3d, MultiheadAttention)")
    ignore: tuple[str, ...] = option((), doc="module names or re: patterns kept in float")
    qat: TrainConfig | None = option(None, doc="quantization-aware training: fine-tune with the weights "
                                               "fake-quantized (straight-through estimator, LSQ learned "
                                               "scales) before storing the codes; train fields")
    smooth: float | None = smooth_option()
    calibration: CalibrationConfig = calibration_option()

    CHANGES_WEIGHTS = True

    def validate(self) -> None:
        if self.qat is not None and self.qat.early_stopping:
            raise RecipeError("quantize.qat.early_stopping: not available (the learned scales are not rolled "
                              "back with the best epoch's weights); set early_stopping: 0")
        if self.activations != "none" and self.granularity == "group":
            raise RecipeError(f"quantize.activations: {self.activations} needs granularity channel or tensor "
                              "(an integer kernel has one weight scale per output channel), not group")
        if self.kernel == "int4pack" and not int4_applies(self):
            raise RecipeError("quantize.kernel: int4pack runs weight-only 4-bit group codes (activations: none, "
                              f"bits: 4, granularity: group), not activations: {self.activations}, bits: "
                              f"{self.bits}, granularity: {self.granularity}")
        if self.kernel == "int4pack" and self.group_size not in GROUP_SIZES:
            raise RecipeError(f"quantize.kernel: int4pack takes group_size {', '.join(map(str, GROUP_SIZES))}, "
                              f"not {self.group_size}")

    def check_targets(self, model: nn.Module) -> None:
        _refuse_dynamic_convs(self, _select(model, self))

    def check_ready(self, task=None) -> None:
        super().check_ready(task)
        if self.activations == "static" and task is not None:
            try:
                task.split("train")
            except UserError:
                raise RecipeError(f"quantize.activations: static needs calibration data, and task {task.spec!r} "
                                  "has none (random inputs only); use activations: dynamic, or a task with "
                                  "data") from None
        if self.smooth is not None:
            require_data(task, "quantize.smooth", SMOOTH_NEEDS)

    def check_model(self, model: nn.Module) -> None:
        """RecipeError naming every targeted layer whose inputs per channel ``group_size`` does
        not divide (granularity: group), and with ``kernel: int4pack`` every Linear the int4
        kernel cannot take."""
        if self.granularity != "group":
            return
        bad = [(name, k) for name, module in _select(model, self)
               if not isinstance(module, QuantMultiheadAttention) and not _refusal(module)
               for k in sorted({getattr(module, w)[0].numel() for w in _weights(module)}) if k % self.group_size]
        if bad:
            shown = ", ".join(f"{n} ({k})" for n, k in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise RecipeError(f"quantize.group_size: {self.group_size} does not divide the inputs per channel "
                              f"of {len(bad)} targeted layer(s): {shown}; pick a divisor or add them to ignore")
        if self.kernel == "int4pack":
            unfit = int4_refusals(_linears(model, self), self.group_size)
            if unfit:
                raise RecipeError(f"quantize.kernel: int4pack cannot run {len(unfit)} targeted Linear layer(s): "
                                  + "; ".join(f"{n}: {why}" for n, why in unfit[:4])
                                  + ("" if len(unfit) <= 4 else f" and {len(unfit) - 4} more")
                                  + "; add them to ignore or use kernel: auto")


def _select(model: nn.Module, config: LinearQuantConfig) -> list[tuple[str, nn.Module]]:
    return select_modules(model, config.targets, config.ignore, kinds=PATTERN_KINDS, what="quantize.targets",
                          refuse=_refusal)


def _linears(model: nn.Module, config: LinearQuantConfig, chosen=None) -> list[tuple[str, nn.Linear]]:
    """The chosen plain Linear layers (those an integer or int4 kernel may run)."""
    return [(n, m) for n, m in (chosen if chosen is not None else _select(model, config))
            if type(m) in (nn.Linear, NonDynamicallyQuantizableLinear)]


@register_method("quantize.linear", LinearQuantConfig)
def _linear_quant(model: nn.Module, config: LinearQuantConfig, ctx) -> nn.Module:
    """Round-to-nearest affine/symmetric weight quantization, per tensor, channel or group."""
    qargs = dict(bits=config.bits, granularity=config.granularity, group_size=config.group_size,
                 symmetric=config.symmetric)
    chosen = _select(model, config)
    int8 = _int8_plan(model, config, ctx, chosen)
    kernels = _Kernels(model, config, ctx, list(int8))
    done: dict[int, nn.Module] = {}  # id(float weight) -> its quantized layer: ties are kept
    config.check_model(model)
    int4, int4_row = int4_plan(model, config, ctx, _linears(model, config, chosen), qargs)
    if config.smooth is not None:
        batches = calibration_batches(ctx, config.calibration, "quantize.smooth", SMOOTH_NEEDS)
        smooth_model(model, config.smooth, ctx, batches, {n for n, _ in chosen})
    qat = None
    if config.qat is not None:
        from .qat import store_codes, train_qat
        qat = train_qat(model, {n: _weights(m) for n, m in chosen if not _refusal(m)}, ctx, config.qat, **qargs)
    reference = FloatReference(model, ctx, config.calibration)    # each layer's error, for the row
    for name, module in chosen:
        if isinstance(module, QuantMultiheadAttention):
            continue                # matched by a pattern, quantized by an earlier step
        if _refusal(module):        # matched by a pattern only: stays float, said so
            log.warning("quantize: %s (%s) stays in float: %s", name, type(module).__name__, _refusal(module))
            continue
        cls = _quantized_class(module)
        weights = [getattr(module, w) for w in _weights(module)]
        if name in int8:
            cls = Int8Conv2d if isinstance(module, nn.Conv2d) else Int8Linear
            q = cls.from_float(module, **int8[name], **qargs)
        elif name in int4:
            cls = Int4Linear
            q = cls.from_float(module, **int4[name], **qargs)
        else:
            q = cls.from_float(module, **qargs)
        if qat is not None:       # trained scales and codes (QAT starts from min/max scales)
            store_codes(qat, model, name, q, _weights(module))
        elif config.observer != "minmax":
            _observe(q, weights, config)
        if name in int8:
            kernels.pick(name, q)          # before replace_module records its rebuild arguments
        first = done.get(id(weights[0]))
        if (first is not None and type(first) is cls and hasattr(q, "weight_q")
                and first.weight_q.shape == q.weight_q.shape):
            q.share_codes_with(first)
        done.setdefault(id(weights[0]), q)
        replace_module(model, name, q)
        if isinstance(q, QuantMultiheadAttention) and type(q.out_proj) is not NonDynamicallyQuantizableLinear:
            replace_module(model, f"{name}.out_proj", q.out_proj)  # quantized before: the replay puts it back
    if int8:
        kernels.report(model)
    if int4_row is not None and ctx is not None:
        ctx.info.setdefault("metrics", {})["int4"] = int4_row
    reference.record(model)
    return model


def _observe(q: nn.Module, weights: list, config: LinearQuantConfig) -> None:
    """Re-quantize ``q``'s weights with the scales of ``config.observer``
    (:func:`~torchslim.methods.quantize.primitives.choose_qparams_observed`)."""
    for name, w in zip(q._qweights, weights):
        w = w.detach().cpu()
        q.set_weight(w, name, qparams=P.choose_qparams_observed(
            w, config.bits, config.granularity, config.group_size, config.symmetric, config.observer,
            config.percentile))
def _int8_plan(model: nn.Module, config: LinearQuantConfig, ctx, chosen) -> dict[str, dict]:
    """``name -> Int8Linear.from_float`` arguments for each chosen Linear (activations dynamic or
    static; static ranges observed on calibration batches); empty for weight-only."""
    if config.activations == "none":
        return {}
    _refuse_dynamic_convs(config, chosen)
    names = [n for n, m in chosen if type(m) in (nn.Linear, NonDynamicallyQuantizableLinear)]
    if config.activations == "static" and config.symmetric:
        names += [n for n, m in chosen if _int8_conv(m)]
    weight_only = sorted({type(m).__name__ for n, m in chosen if n not in names and not _refusal(m)} - {"Embedding"})
    if weight_only and ctx is not None:
        kinds = "Linear and Conv2d (symmetric codes)" if config.activations == "static" else "Linear"
        ctx.warn("int8-weight-only", f"quantize: activations: {config.activations} runs {kinds} layers on "
                                     f"integer kernels; {', '.join(weight_only)} layers keep weight-only codes "
                                     "(float compute)")
    kernel = "int8" if config.kernel == "auto" else config.kernel
    plan = {n: {"activations": config.activations, "kernel": kernel} for n in names}
    if config.activations == "static":
        task = ctx.require_task("quantize: activations: static")
        ranges = observe_ranges(model, names, task, ctx.calibration_batches(config.calibration.samples))
        for n in names:
            plan[n]["input_range"] = ranges[n]
    return plan


def _refuse_dynamic_convs(config: LinearQuantConfig, chosen: list[tuple[str, nn.Module]]) -> None:
    """RecipeError for a Conv2d named exactly in ``targets`` under ``activations: dynamic`` (a
    pattern-picked one keeps weight-only codes, with a warning)."""
    named = [n for n, m in chosen if isinstance(m, nn.Conv2d) and n in config.targets]
    if config.activations == "dynamic" and named:
        raise RecipeError(f"quantize.activations: dynamic: {named[0]} is a Conv2d, and int8 convolutions "
                          "need static activations (one calibrated scale per layer); use activations: "
                          "static, or drop it from targets to keep weight-only codes")


def _int8_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv2d an Int8Conv2d can replace (numeric or symmetric padding)."""
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and symmetric_padding(module.padding, list(module.kernel_size), list(module.dilation),
                                 list(module.stride)) is not None)


class _Kernels:
    """``kernel: auto``: each Int8Linear (Int8Conv2d) keeps the faster of int8 and float compute
    at the rows (input shapes) the task's example inputs give it at batch 1 and 32 (timed once
    per distinct shape); the row's ``int8`` entry says what runs where."""

    def __init__(self, model: nn.Module, config: LinearQuantConfig, ctx, names: list[str]) -> None:
        self.config, self.ctx, self.measured, self.by_shape = config, ctx, {}, {}
        task = getattr(ctx, "task", None)
        auto = bool(names) and config.kernel == "auto" and task is not None
        convs = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
        linears = [n for n in names if n not in convs]
        self.rows = input_rows(model, linears, task, AUTO_BATCHES) if auto and linears else {}
        self.shapes = input_shapes(model, convs, task, AUTO_BATCHES) if auto and convs else {}
        if names and config.kernel == "auto" and not task:
            log.info("quantize: kernel auto without a task: every Int8Linear runs the int8 kernel")

    def pick(self, name: str, layer: Int8Linear | Int8Conv2d) -> None:
        if name in self.shapes:     # convolutions of one geometry on one input shape are timed once
            key = (tuple(sorted((k, str(v)) for k, v in layer.conv_args.items())), tuple(self.shapes[name]))
            if key not in self.by_shape:
                self.by_shape[key] = choose_conv_kernel(layer, self.shapes[name])
            layer.kernel, self.measured[name] = self.by_shape[key]
            return
        if name not in self.rows:
            return
        key = (layer.in_features, layer.out_features, layer.bias is not None, tuple(self.rows[name]))
        if key not in self.by_shape:
            self.by_shape[key] = choose_kernel(layer, self.rows[name])
        layer.kernel, self.measured[name] = self.by_shape[key]

    def report(self, model: nn.Module) -> None:
        if any(isinstance(m, Int8Conv2d) for m in model.modules()) and not onednn_conv_available():
            self.ctx.warn("int8-conv-fallback", "quantize: no oneDNN int8 convolution in this torch build: "
                                                "Int8Conv2d layers run the float reference of the int8 math")
        if int8_engine() is None:
            self.ctx.warn("int8-fallback", "quantize: no x86/fbgemm quantized engine in this torch build: "
                                           "Int8Linear layers run the float reference of the int8 math "
                                           "(latency measured on that)")
        row = summary(model, self.config.activations, self.measured)
        self.ctx.info.setdefault("metrics", {})["int8"] = row
        counts = row.get("kernels") or {}
        if self.config.kernel == "auto" and counts and set(counts) == {"dequant"}:
            self.ctx.warn("int8-all-dequant", f"quantize: kernel: auto timed float compute faster than the int8 "
                                              f"kernels on every one of the {counts['dequant']} layer(s) on this "
                                              "CPU, so activations stay float (weight-only codes); give kernel: "
                                              "int8 to force integer compute")
