"""Attention transfer: a new student trained to reproduce the teacher's attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import ModelRef, option
from ...registry import register_method
from ...train.config import AttentionTerm, TrainConfig
from .hint import LayerPairsDistillConfig, run_layer_pairs


@dataclass(frozen=True)
class AttentionDistillConfig(LayerPairsDistillConfig):
    """Attention transfer into a new student.

    For CNN feature maps (named layers returning ``(N, C, H, W)``): Zagoruyko & Komodakis
    (2017, eq. 2), ``task loss + beta / 2 * sum_j mean_n ||Q_s^j - Q_t^j||_2`` with ``Q = sum_c
    |A_c|^p`` flattened and L2-normalised (channel counts may differ, spatial sizes must match).
    For transformer attention modules returning ``(output, probabilities)`` (Hugging Face
    BERT-style ``encoder.layer.0.attention.self``): ``beta * sum_j D(P_t^j, P_s^j)``, ``D`` the
    KL divergence (``loss: kl``) or mean squared difference (``loss: mse``) of the attention
    probabilities; equal head counts are compared head by head, different ones after averaging
    over heads. ``alpha > 0`` adds logit distillation in the same run.

    The plugin is :class:`~torchslim.train.distill.AttentionTransfer`; any fine-tune can add the
    same term with ``distill: {teacher: baseline, attention: {layers: {...}}}``.

    Examples
    --------
    >>> c = AttentionDistillConfig.from_dict({"student": "zoo:digits-cnn", "layers": {"3": "3"}})
    >>> c.attention.beta, c.attention.p, c.alpha
    (1.0, 2.0, 0.0)
    """

    beta: float = option(1.0, low=0.0, doc="weight beta of the attention loss (beta/2 for CNN maps)")
    p: float = option(2.0, low=0.0, low_open=True, doc="exponent of the CNN attention map sum_c |A_c|^p")
    loss: str = option("kl", choices=("kl", "mse"), doc="distance of attention probabilities (transformers)")

    @classmethod
    def example(cls) -> "AttentionDistillConfig":
        return cls(student=ModelRef(spec="zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32}),
                   layers={"3": "3"}, train=TrainConfig(epochs=2, loggers=()))

    def term(self) -> AttentionTerm:
        return AttentionTerm(layers=self.layers, beta=self.beta, p=self.p, loss=self.loss)

    @property
    def attention(self) -> AttentionTerm:
        """The attention term these fields describe (what the plugin is built from)."""
        return self.term()


@register_method("distill.attention", AttentionDistillConfig)
def _distill_attention(model: nn.Module, config: AttentionDistillConfig, ctx) -> nn.Module:
    """Attention transfer (CNN maps or transformer attention probabilities) into a new student."""
    return run_layer_pairs(model, config, ctx, "distill.attention")
