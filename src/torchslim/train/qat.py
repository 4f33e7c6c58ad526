"""Quantization-aware training as a plugin of the one trainer: weights fake-quantized in every
forward pass, LSQ step sizes trained with the model.

The layers stay the float modules they are (``nn.Linear``, ``nn.Conv2d``, ...); while the
plugin is attached, a forward pre-hook on the whole model puts each fake-quantized weight in its
module's instance ``__dict__``, where attribute lookup finds it before the registered parameter,
and a forward hook on the model removes them again. Hooking the model rather than each layer
matters: ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``, and
``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1.weight`` the same way. So state-dict keys, DDP's parameter list, checkpoints and every other
plugin (masks, distillation) see the model unchanged, and the gradient reaches the float
parameter through the straight-through estimator. The learned scales are the plugin's own
parameters (trained with the model's, averaged over ranks under torchrun, checkpointed in
:meth:`FakeQuantPlugin.state_dict`). After training, :meth:`FakeQuantPlugin.codes` gives the
integer codes and scales the quantized layers store.

The math is :mod:`torchslim.methods.quantize.fakequant` (tensor functions only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.quantize import fakequant as F
from ..methods.quantize import primitives as P
from .plugins import TrainingPlugin

#: what a plugin can train: integer codes with learned scales, binary, ternary weights
SCHEMES = ("linear", "binary", "ternary")


class FakeQuantPlugin(TrainingPlugin):
    """Fake-quantize named weights during training (Esser et al. 2020 LSQ for ``linear``;
    binary / ternary with the straight-through estimator).

    Parameters
    ----------
    targets : dict of str to list of str
        Module name -> the names of its weight tensors (``["weight"]``, ``["in_proj_weight"]``).
        A tensor shared by several modules (tied) gets one scale.
    scheme : {"linear", "binary", "ternary"}, default="linear"
    bits, granularity, group_size, symmetric
        As :class:`~torchslim.methods.quantize.linear.LinearQuantConfig` (``linear`` only).
        Scales start at the min/max (round-to-nearest) scale, so training starts from the
        post-training quantized model; affine zero points stay at their initial value.

    Attributes
    ----------
    scales : dict of (str, str) to nn.Parameter
        ``(module, weight) -> scale`` of shape ``(R, G)`` (``linear`` only), set by
        :meth:`attach`.

    Raises
    ------
    ValueError
        An unknown scheme.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> plugin = FakeQuantPlugin({"0": ["weight"]}, bits=2)
    >>> plugin.attach(model)                  # the trainer calls this in setup()
    >>> y = model(torch.randn(2, 4))          # computed with codes in {-1, 0, 1} times the scales
    >>> plugin.detach()
    >>> codes, scale, zero = plugin.codes(model, "0")
    >>> sorted(set(codes.flatten().tolist())) <= [-1, 0, 1], tuple(scale.shape), zero
    (True, (3, 1), None)
    """

    def __init__(self, targets: dict[str, list[str]], scheme: str = "linear", *, bits: int = 8,
                 granularity: str = "channel", group_size: int = 128, symmetric: bool = True) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"FakeQuantPlugin: scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        self.targets = {m: list(ws) for m, ws in targets.items()}
        self.scheme, self.bits, self.granularity = scheme, bits, granularity
        self.group_size, self.symmetric = group_size, symmetric
        self.qmin, self.qmax = P.qrange(bits, symmetric)
        self.scales: dict[tuple[str, str], nn.Parameter] = {}
        self.zeros: dict[tuple[str, str], torch.Tensor | None] = {}
        self._handles: list[Any] = []

    # -- set-up ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Scales initialised from the current weights (once; a tied tensor shares its first
        module's) and the hooks installed on ``model``."""
        self.detach()
        first: dict[int, tuple[str, str]] = {}
        for name, weights in self.targets.items():
            module = model.get_submodule(name)
            for w_name in weights:
                key, w = (name, w_name), module._parameters[w_name]
                if self.scheme == "linear" and key not in self.scales:
                    tied = first.get(id(w))
                    if tied is not None:
                        self.scales[key], self.zeros[key] = self.scales[tied], self.zeros[tied]
                    else:
                        s, z = P.choose_qparams(w, self.bits, self.granularity, self.group_size, self.symmetric)
                        self.scales[key] = nn.Parameter(s.to(w.device))
                        self.zeros[key] = None if self.symmetric else z.to(w.device)
                first.setdefault(id(w), key)
        modules = {name: model.get_submodule(name) for name in self.targets}

        def shadow(root: nn.Module, args: Any) -> None:
            for name, module in modules.items():
                for w_name in self.targets[name]:
                    module.__dict__[w_name] = self.fake(module._parameters[w_name], (name, w_name))

        def unshadow(root: nn.Module, args: Any, output: Any) -> None:
            for name, module in modules.items():
                for w_name in self.targets[name]:
                    module.__dict__.pop(w_name, None)

        self._unshadow = lambda: unshadow(model, (), None)
        self._handles = [model.register_forward_pre_hook(shadow),
                         model.register_forward_hook(unshadow, always_call=True)]

    def detach(self) -> None:
        """Remove the hooks and any fake-quantized weight left in place (the scales are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self, "_unshadow", None) is not None:
            self._unshadow()
            self._unshadow = None

    def fake(self, w: torch.Tensor, key: tuple[str, str]) -> torch.Tensor:
        """The fake-quantized value of weight ``w`` (``key`` = (module, weight) names)."""
        if self.scheme == "binary":
            return F.binary_fake_quantize(w)
        if self.scheme == "ternary":
            return F.ternary_fake_quantize(w)
        return F.lsq_fake_quantize(w, self.scales[key], self.zeros[key], self.qmin, self.qmax)

    def codes(self, model: nn.Module, name: str, w_name: str = "weight") -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]:
        """``(codes, scale, zero)`` of weight ``w_name`` of module ``name`` as the quantized layer
        stores them: int8 codes of the weight's shape, scale ``(R, G)``, zero ``(R, G)`` or None.
        Binary and ternary weights are 2-bit symmetric per-channel codes (scale ``alpha``)."""
        w = model.get_submodule(name)._parameters[w_name]
        if self.scheme == "binary":
            return (*F.binary_codes(w), None)
        if self.scheme == "ternary":
            return (*F.ternary_codes(w), None)
        if (name, w_name) not in self.scales:   # never trained (epochs: 0): the min/max scales
            self.attach(model)
            self.detach()
        scale, zero = self.scales[(name, w_name)].detach(), self.zeros[(name, w_name)]
        return F.lsq_codes(w, scale, zero, self.qmin, self.qmax), scale.clone(), zero

    # -- the trainer's hooks ----------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        self.attach(trainer.model)

    def parameters(self) -> list[nn.Parameter]:
        unique = {id(p): p for p in self.scales.values()}
        return list(unique.values())

    def teardown(self) -> None:
        self.detach()

    def state_dict(self) -> dict[str, Any] | None:
        if not self.scales:
            return None
        return {"scales": {f"{m}:{w}": p.detach().clone() for (m, w), p in self.scales.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy the checkpointed scales into the existing parameters (the optimizer holds them)."""
        with torch.no_grad():
            for key, value in state["scales"].items():
                m, w = key.rsplit(":", 1)
                self.scales[(m, w)].copy_(value)
