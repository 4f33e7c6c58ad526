"""Quantization-aware training for the quantize methods (``qat: {train fields}``).

``quantize: {method: linear, bits: 4, qat: {epochs: 3, lr: 0.01}}`` fine-tunes the model with
its targeted weights fake-quantized (:class:`~torchslim.train.qat.FakeQuantPlugin`: the
straight-through estimator and LSQ's learned step sizes) in the one trainer, so checkpoints,
resume, torchrun and ``distill:`` in the ``qat`` block work as in any fine-tune; then the
layers become the ordinary quantized layers (``QuantLinear``, ``QuantConv2d``, ...) holding the
codes and scales training arrived at. The artifact is that of post-training quantization.

Binary and ternary weights train through the same plugin (``scheme="binary"`` / ``"ternary"``):
``quantize: {method: binary, qat: {...}}`` (and ``ternary``) train that way and then store the
trained weights as the coded layers of :mod:`torchslim.layers.codebook`
(:func:`~.coded.run_coded`), whose decoding is the plugin's fake quantization; the plugin's
:meth:`~FakeQuantPlugin.codes` also fit a 2-bit symmetric per-channel layer.
"""

from __future__ import annotations

from torch import nn

from ...train.config import TrainConfig
from ...train.qat import FakeQuantPlugin


def train_qat(model: nn.Module, targets: dict[str, list[str]], session, config: TrainConfig,
              scheme: str = "linear", **qargs) -> FakeQuantPlugin:
    """Fine-tune ``model`` in place with the weights of ``targets`` (module name -> weight
    names) fake-quantized; returns the plugin, whose :meth:`~FakeQuantPlugin.codes` give each
    weight's codes and scale. ``qargs``: ``bits``, ``granularity``, ``group_size``,
    ``symmetric`` (scheme ``linear``)."""
    plugin = FakeQuantPlugin(targets, scheme, **qargs)
    session.train(model, config, desc="qat", sub="train-qat", plugins=[plugin])
    return plugin


def store_codes(plugin: FakeQuantPlugin, model: nn.Module, name: str, layer: nn.Module,
                weights: list[str]) -> None:
    """Write the trained codes of float module ``name``'s ``weights`` into its quantized
    ``layer`` (built by ``from_float``, not yet in the model)."""
    for w in weights:
        codes, scale, zero = plugin.codes(model, name, w)
        layer.set_codes(codes.to(layer._q_tensors(w)[0].device), scale, zero, name=w)
