"""``Int8Linear`` and ``Int8Conv2d``: layers whose weights *and* activations are int8, run on
integer kernels (``Int8Conv2d``: static activations on oneDNN; see its docstring).

``QuantLinear`` stores int8 codes and computes in float on the dequantized weight (float speed).
``Int8Linear`` keeps the same codes, scales and artifact tensors and multiplies int8 activations
by int8 weights with int32 accumulation, then rescales:

- ``activations="dynamic"``: one activation scale per token (row of the input), computed at run
  time, as in ZeroQuant (Yao et al., 2022, §3: "token-wise quantization" of activations with
  group-wise/channel-wise weights) and LLM.int8() (Dettmers et al., 2022, eq. 1-3 without the
  outlier split):

      a_i = max_k |x_ik|,     y_i = a_i * (Q(x_i / a_i) . W_q^T) * s_x * s_w + b      (x: (M, K))

  PyTorch's integer CPU kernel (``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32``,
  fbgemm / x86 engine: float in, float out) quantizes its input with one scale per call;
  dividing each row by its own absolute maximum first puts every row in [-1, 1], so the one
  scale ``1 / L`` (zero point ``L``) quantizes each token symmetrically with ``L`` levels a side. Activations have 8 bits with weights of at most 7 bits and 7 bits with 8-bit weights:
  without VNNI, x86 sums pairs of uint8 x int8 products in a saturating int16
  (:func:`~torchslim.methods.quantize.primitives.activation_bits`); ``bits: 7`` is the accurate
  choice on such CPUs (MiniLM: cosine to fp32 0.9967 against 0.9953 with 8-bit weights).
- ``activations="static"``: one activation scale and zero point per layer (unsigned, affine) fixed
  from calibration data (``input_scale``, ``input_zero_point`` buffers), on the same kernel.

``kernel`` records what the layer runs, chosen when it was quantized and kept in the artifact
(a rebuild argument), so a reloaded layer runs the same kernel and gives the same outputs:

- ``"int8"``: PyTorch's quantized CPU engine (``torch.backends.quantized.engine``: ``x86`` or
  ``fbgemm``); the packed weight is built from the codes on first use (never stored);
- ``"reference"``: the same quantization of activations computed in float on integer-valued
  tensors (:func:`~torchslim.methods.quantize.primitives.int8_linear_reference`): where the
  integer engine is missing (another CPU, a GPU tensor) or the input is not float32 on CPU, or
  the layer is used with gradients on (integer kernels have no backward);
- ``"dequant"``: float compute on the dequantized weight, as ``QuantLinear`` does, for a layer
  where the integer kernel measured slower than float at the model's shapes.

Weights must be per-channel or per-tensor (an integer kernel has one scale per output channel);
symmetric or affine codes both work.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..methods.quantize import primitives as P  # pure tensor math, no method registration
from ..modules import register_module_class
from .quantized import QuantConv2d, QuantLinear, float_only

ACTIVATIONS = ("dynamic", "static")
KERNELS = ("int8", "reference", "dequant")
#: quantized engines whose packed linear weights the integer path uses
INT8_ENGINES = ("x86", "fbgemm")


def int8_engine() -> str | None:
    """The quantized CPU engine the ``int8`` kernel runs on, or None when this build of torch
    has neither ``x86`` nor ``fbgemm`` (ARM builds: ``qnnpack`` only)."""
    engine = torch.backends.quantized.engine
    if engine in INT8_ENGINES:
        return engine
    supported = torch.backends.quantized.supported_engines
    return next((e for e in INT8_ENGINES if e in supported), None)


def _int8_linear(x: torch.Tensor, scale: float, zero_point: int, packed: Any) -> torch.Tensor:
    """(M, K) float32 -> (M, N) float32: ``x`` quantized with ``scale``/``zero_point`` (unsigned),
    int8 x int8 products summed in int32 by the quantized engine, rescaled to float."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero_point, packed)


class _Int8Layer:
    """What the int8 layers share: activation bits, the calibrated input scale, the packed weight
    dropped on ``train()``/``eval()``, and ``activations``/``kernel`` as rebuild arguments."""

    bits: int
    activations: str
    kernel: str

    @property
    def act_bits(self) -> int:
        """Activation bits: 8 with weights of at most 7 bits, else 7
        (:func:`~torchslim.methods.quantize.primitives.activation_bits`)."""
        return P.activation_bits(self.bits)

    def set_input_range(self, lo: float, hi: float) -> None:
        """Static activations: the uint8 scale and zero point covering [lo, hi] (and 0)."""
        scale, zero = P.activation_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), self.act_bits)
        self.input_scale.copy_(scale)
        self.input_zero_point.copy_(zero)

    def train(self, mode: bool = True):
        self.__dict__.pop("_packed_cache", None)
        return super().train(mode)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(**super().rebuild_args(), activations=self.activations, kernel=self.kernel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations={self.activations}, kernel={self.kernel}"


def _integer_kernel_unusable(x: torch.Tensor) -> bool:
    """Whether an integer CPU kernel cannot take ``x``: not float32 on CPU, or gradients on
    (integer kernels have no backward)."""
    return (x.device.type != "cpu" or x.dtype != torch.float32
            or (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()))


@register_module_class
class Int8Linear(_Int8Layer, QuantLinear):
    """``nn.Linear`` with int8 weights and int8 activations: input (*, in_features) float32 ->
    output (*, out_features) float32.

    Parameters
    ----------
    activations : {"dynamic", "static"}, default="dynamic"
        Per-token scales computed at run time, or one calibrated scale per layer.
    kernel : {"int8", "reference", "dequant"}, default="int8"
        What the forward pass runs (see the module docstring); ``int8`` falls back to
        ``reference`` where the engine is unavailable.

    Other parameters are those of :class:`~torchslim.layers.QuantLinear`; ``granularity`` must
    be ``channel`` or ``tensor``.

    Raises
    ------
    ValueError
        ``granularity="group"``, an unknown ``activations`` or ``kernel``.

    Examples
    --------
    >>> import torch
    >>> layer = Int8Linear.from_float(torch.nn.Linear(64, 8), bits=7).eval()
    >>> with torch.inference_mode():
    ...     layer(torch.randn(3, 64)).shape
    torch.Size([3, 8])
    >>> layer.weight_q.dtype, layer.act_bits
    (torch.int8, 8)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 granularity: str = "channel", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32", activations: str = "dynamic", kernel: str = "int8") -> None:
        if granularity == "group":
            raise ValueError("Int8Linear needs one weight scale per output channel (granularity channel or "
                             "tensor); group scales have no integer kernel")
        if activations not in ACTIVATIONS:
            raise ValueError(f"Int8Linear: activations must be one of {ACTIVATIONS}, not {activations!r}")
        if kernel not in KERNELS:
            raise ValueError(f"Int8Linear: kernel must be one of {KERNELS}, not {kernel!r}")
        super().__init__(in_features, out_features, bias, bits=bits, granularity=granularity,
                         group_size=group_size, symmetric=symmetric, dtype=dtype)
        self.activations, self.kernel = activations, kernel
        if activations == "static":   # uint8 affine input quantization, set by calibration
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros(()))

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, *, activations: str = "dynamic", kernel: str = "int8",
                   input_range: tuple[float, float] | None = None, **qargs: Any) -> "Int8Linear":
        """Quantize ``linear``'s weight (``qargs`` as :meth:`QuantLinear.from_float`); a static
        layer needs ``input_range`` = (min, max) of its calibration inputs."""
        q = super().from_float(linear, activations=activations, kernel=kernel, **qargs)
        if activations == "static":
            if input_range is None:
                raise ValueError("Int8Linear.from_float: activations='static' needs input_range (calibration)")
            q.set_input_range(*input_range)
        return q.to(linear.weight.device).train(linear.training)

    # -- the integer kernel ------------------------------------------------------------------
    def _packed(self) -> Any:
        """fbgemm/x86 packed weight built from the codes (kept until codes or scales change)."""
        codes, scale, zero = self._q_tensors("weight")
        key = tuple((t.data_ptr(), t._version) for t in (codes, scale, zero) if t is not None)
        cache = self.__dict__.get("_packed_cache")
        if cache is None or cache[0] != key:
            n = codes.shape[0]
            scales = scale.reshape(-1).expand(n).double().contiguous()
            zeros = (torch.zeros(n) if zero is None else zero.reshape(-1).expand(n)).round().long().contiguous()
            with warnings.catch_warnings():   # quantized tensors are deprecated in torch; this packing
                warnings.simplefilter("ignore")   # is their only use and never reaches the artifact
                qweight = torch._make_per_channel_quantized_tensor(codes.cpu(), scales.cpu(), zeros.cpu(), 0)
            # the static op adds the bias itself; the dynamic one gets it after the row rescale
            bias = self.bias.detach().float() if (self.activations == "static" and self.bias is not None) else None
            cache = self.__dict__["_packed_cache"] = (key, torch.ops.quantized.linear_prepack(qweight, bias))
        return cache[1]

    def runs_on(self, x: torch.Tensor) -> str:
        """The kernel the forward pass uses for input ``x``: ``kernel``, or ``reference`` where
        ``int8`` cannot run (no engine, not float32 on CPU, gradients on); ``dequant`` under
        :func:`~torchslim.layers.quantized.float_compute` and ONNX export."""
        if float_only():
            return "dequant"
        if self.kernel == "int8" and (int8_engine() is None or _integer_kernel_unusable(x)):
            return "reference"
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.runs_on(x)
        if kernel == "dequant":
            return super().forward(x)
        if kernel == "reference":
            codes, scale, zero = self._q_tensors("weight")
            static = (self.input_scale, self.input_zero_point) if self.activations == "static" else None
            return P.int8_linear_reference(x, codes, scale, zero, self.bias, static, self.act_bits).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                   # (M, K)
        if self.activations == "static":
            y = _int8_linear(x2, float(self.input_scale), int(self.input_zero_point), self._packed())
        else:   # rows scaled into [-1, 1], then L levels a side: q - z = round(L x / a) in [-L, L]
            a = P.token_absmax(x2)                                      # (M, 1)
            levels = 2 ** (self.act_bits - 1) - 1
            y = _int8_linear(x2 / a, 1.0 / levels, levels, self._packed())   # (M, N)
            y = y * a if self.bias is None else torch.addcmul(self.bias, y, a)
        return y.reshape(*shape[:-1], y.shape[-1])



def onednn_conv_available() -> bool:
    """Whether this build of torch has oneDNN's quantized convolution
    (``torch.ops.onednn.qconv2d_pointwise``, the op PyTorch's x86 inductor int8 path lowers to)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def symmetric_padding(padding: Any, kernel_size: list[int], dilation: list[int], stride: list[int]) -> list[int] | None:
    """``padding`` as two integers: lists as they are, ``"valid"`` as 0, ``"same"`` (stride 1)
    as half the dilated kernel when that is symmetric; None when it is not (even kernels)."""
    if not isinstance(padding, str):
        return list(padding)
    if padding == "valid":
        return [0, 0]
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    return [t // 2 for t in total] if all(t % 2 == 0 for t in total) and list(stride) == [1, 1] else None


@register_module_class
class Int8Conv2d(_Int8Layer, QuantConv2d):
    """``nn.Conv2d`` with int8 weights and static int8 activations: input (N, C_in, H, W)
    float32 -> output (N, C_out, H_out, W_out) float32 (channels-last memory on the ``int8``
    kernel, same values).

    The input is quantized with one calibrated scale and zero point (unsigned affine, as
    ``Int8Linear`` with ``activations="static"``), convolved with the symmetric int8 weight codes
    with int32 accumulation and rescaled to float with the bias added (Jacob et al., 2018, eq. 7;
    the output stays float, so no output range is calibrated and the next layer takes it as is).
    Kernels (``kernel``, kept in the artifact):

    - ``"int8"``: oneDNN's ``torch.ops.onednn.qconv2d_pointwise`` (float output); the packed
      weight is built from the codes on first use, never stored. Without VNNI, AVX2 sums pairs of
      uint8 x int8 products in a saturating int16: activations have 7 bits with 8-bit weights
      (:func:`~torchslim.methods.quantize.primitives.activation_bits`);
    - ``"reference"``: the same integer math in float64
      (:func:`~torchslim.methods.quantize.primitives.int8_conv2d_reference`), where oneDNN is
      missing, the input is not float32 on CPU, or gradients are on;
    - ``"dequant"``: float convolution on the dequantized weight (``QuantConv2d``), for a layer
      whose integer kernel measured slower than float (depthwise and thin 1x1 convolutions).

    Grouped and depthwise convolutions are supported. Refused (ValueError): group scales, affine
    weight codes (oneDNN takes no weight zero point), activations other than ``static``, and
    ``"same"`` padding that is not symmetric.

    Examples
    --------
    >>> import torch
    >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    >>> layer = Int8Conv2d.from_float(conv, input_range=(-3.0, 3.0), bits=8).eval()
    >>> with torch.inference_mode():
    ...     layer(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int = 1, bias: bool = True, *,
                 bits: int = 8, granularity: str = "channel", group_size: int = 128, symmetric: bool = True,
                 dtype: str = "float32", activations: str = "static", kernel: str = "int8") -> None:
        if granularity == "group":
            raise ValueError("Int8Conv2d needs one weight scale per output channel (granularity channel or "
                             "tensor); group scales have no integer kernel")
        if not symmetric:
            raise ValueError("Int8Conv2d needs symmetric weight codes (the oneDNN int8 convolution takes no "
                             "weight zero point); use symmetric: true")
        if activations != "static":
            raise ValueError(f"Int8Conv2d: activations must be 'static' (a calibrated input scale), "
                             f"not {activations!r}")
        if kernel not in KERNELS:
            raise ValueError(f"Int8Conv2d: kernel must be one of {KERNELS}, not {kernel!r}")
        if symmetric_padding(padding, list(kernel_size), list(dilation), list(stride)) is None:
            raise ValueError(f"Int8Conv2d: padding {padding!r} is not symmetric for kernel {list(kernel_size)}; "
                             "give it as numbers")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric,
                         dtype=dtype)
        self.activations, self.kernel = activations, kernel
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros(()))

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, *, activations: str = "static", kernel: str = "int8",
                   input_range: tuple[float, float] | None = None, **qargs: Any) -> "Int8Conv2d":
        """Quantize ``conv``'s weight (``qargs`` as :meth:`QuantConv2d.from_float`) with the input
        scale covering ``input_range`` = (min, max) of its calibration inputs (ValueError without)."""
        if input_range is None:
            raise ValueError("Int8Conv2d.from_float needs input_range (the calibration inputs' min and max)")
        q = super().from_float(conv, activations=activations, kernel=kernel, **qargs)
        q.set_input_range(*input_range)
        return q.to(conv.weight.device).train(conv.training)

    def _geometry(self) -> tuple[list[int], list[int], list[int], int]:
        a = self.conv_args
        padding = symmetric_padding(a["padding"], a["kernel_size"], a["dilation"], a["stride"])
        return list(a["stride"]), padding, list(a["dilation"]), a["groups"]

    # -- the integer kernel ------------------------------------------------------------------
    def _packed(self) -> tuple:
        """(packed weight, input scale, input zero point, weight scales, weight zero points, bias),
        built from the codes on first use and kept until codes, scales or input range change."""
        codes, scale, _ = self._q_tensors("weight")
        tensors = (codes, scale, self.input_scale, self.input_zero_point)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cache = self.__dict__.get("_packed_cache")
        if cache is None or cache[0] != key:
            n = codes.shape[0]
            w_scale = scale.reshape(-1).expand(n).float().contiguous()                    # (C_out,)
            s, z = float(self.input_scale), int(self.input_zero_point)
            stride, padding, dilation, groups = self._geometry()
            packed = torch.ops.onednn.qconv_prepack(codes, w_scale, s, z, stride, padding, dilation, groups, None)
            bias = None if self.bias is None else self.bias.detach().float()
            cache = self.__dict__["_packed_cache"] = (key, (packed, s, z, w_scale,
                                                            torch.zeros(n, dtype=torch.long), bias))
        return cache[1]

    def runs_on(self, x: torch.Tensor) -> str:
        """The kernel the forward pass uses for input ``x``: ``kernel``, or ``reference`` where
        ``int8`` cannot run (no oneDNN, not a float32 4-D CPU tensor, gradients on); ``dequant``
        under :func:`~torchslim.layers.quantized.float_compute` and ONNX export."""
        if float_only():
            return "dequant"
        if self.kernel == "int8" and (not onednn_conv_available() or x.dim() != 4 or _integer_kernel_unusable(x)):
            return "reference"
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.runs_on(x)      # dequant in ONNX export: the weight-only convolution (codes kept)
        if kernel == "dequant":
            return super().forward(x)
        stride, padding, dilation, groups = self._geometry()
        if kernel == "reference":
            codes, scale, _ = self._q_tensors("weight")
            return P.int8_conv2d_reference(x, codes, scale, self.bias, (self.input_scale, self.input_zero_point),
                                           self.act_bits, stride, padding, dilation, groups).to(x.dtype)
        packed, s, z, w_scale, w_zero, bias = self._packed()
        # (N, C_in, H, W) uint8 codes, as P.quantize_activation (round half to even, clamped)
        qx = torch.clamp(torch.round(x / s) + z, 0, 2 ** self.act_bits - 1).to(torch.uint8)
        return torch.ops.onednn.qconv2d_pointwise(qx, s, z, packed, w_scale, w_zero, bias, stride, padding,
                                                  dilation, groups, 1.0, 0, torch.float32, "none", [], "")
