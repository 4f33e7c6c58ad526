"""Weight sharing by k-means (``quantize: {method: kmeans}``), Deep Compression's second stage."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import option
from ...registry import register_method
from ...train.config import TrainConfig
from .coded import CodedQuantConfig, bits_for, check_layer_keys, run_coded


@dataclass(frozen=True)
class KMeansQuantConfig(CodedQuantConfig):
    """Weight sharing (Han et al. 2016, "Deep Compression", sec. 3): the weights of each layer
    are clustered into ``2**bits`` centroids by k-means, initialised linearly over [min, max];
    the layer stores the ``bits``-bit index of each weight and its codebook of float32
    centroids (:class:`~torchslim.layers.CodedLinear` and kin). A pruned layer (one with exact
    zeros) keeps them: index 0 is an exact zero beside ``2**bits - 1`` centroids. With
    ``finetune``, the centroids are trained (the gradient of a centroid is the sum of the
    gradients of its weights, sec. 3.3) while the indices stay fixed. ``layer_bits`` gives some
    layers other widths (the paper: 8 bits for convolutions, 5 for fully connected layers).

    Examples
    --------
    >>> import torchslim
    >>> m = torchslim.build_model("zoo:lenet-300-100")
    >>> q = torchslim.apply(m, KMeansQuantConfig(bits=4))
    >>> q[1].codebook.shape, int(q[1].weight_q.max()) < 16
    (torch.Size([16]), True)
    """

    bits: int = option(5, low=2, high=8, doc="bits per weight index (2**bits centroids per layer)")
    layer_bits: dict[str, int] = option(default_factory=dict, low=2, high=8,
                                        doc="bits for some layers, by module name or re: pattern (first match)")
    finetune: TrainConfig | None = option(None, doc="training of the centroids (and the float parameters) "
                                                    "after clustering, indices fixed")

    SCHEME = "kmeans"
    NO_QAT = "its centroids are trained by finetune: (indices fixed); give finetune: {epochs: N}"

    def layer_coding(self, name: str) -> tuple[int, None]:
        return bits_for(name, self.bits, self.layer_bits), None

    def check_targets(self, model: nn.Module) -> None:
        super().check_targets(model)
        check_layer_keys(model, self.layer_bits)

    @classmethod
    def example(cls) -> "KMeansQuantConfig":
        return cls(bits=6)   # 64 centroids: a small layer's codebook stays small


@register_method("quantize.kmeans", KMeansQuantConfig)
def _kmeans_quant(model: nn.Module, config: KMeansQuantConfig, session) -> nn.Module:
    """Weight sharing by k-means: a codebook per layer, bit-packed indices, centroids fine-tuned."""
    return run_coded(model, config, session)
