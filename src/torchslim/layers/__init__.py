"""Rebuildable layers of the core, and the protocol by which a layer declares its weights.

A layer class that holds weights in a form other than plain parameters (integer codes in
buffers, packed codes, factors) implements::

    def slim_weights(self) -> dict[str, tuple[int, int]]:
        # local tensor name -> (logical number of weights, logical non-zeros)

:func:`torchslim.measure.count_params` then counts that module's own tensors from it instead of
from its parameters, so ``params`` / ``nonzero_params`` are never guessed from dtypes or names.
Modules without it count their parameters (tied ones once); buffers are not weights (BatchNorm
statistics, index tables).

The classes here are registered with :func:`torchslim.modules.register_module_class` on import,
which :mod:`torchslim.artifact` does, so loading an artifact needs no method package.
"""

from .int4 import Int4Linear
from .int8 import Int8Conv2d, Int8Linear
from .attention import PrunedMultiheadAttention, PrunedShiftedWindowAttention
from .codebook import CodedConv1d, CodedConv2d, CodedConv3d, CodedEmbedding, CodedLinear
from .lowrank import CPConv2d, LowRankLinear, TuckerConv2d
from .quantized import (QuantConv1d, QuantConv2d, QuantConv3d, QuantEmbedding, QuantLinear,
                        QuantMultiheadAttention)
from .sparse import SparseLinear

__all__ = ["Int4Linear", "Int8Conv2d", "Int8Linear", "PrunedMultiheadAttention", "PrunedShiftedWindowAttention", "QuantLinear", "QuantConv1d", "QuantConv2d",
           "QuantConv3d", "QuantEmbedding", "QuantMultiheadAttention", "SparseLinear", "LowRankLinear",
           "TuckerConv2d", "CPConv2d", "CodedLinear", "CodedConv1d", "CodedConv2d", "CodedConv3d",
           "CodedEmbedding"]
