"""``SparseLinear``: an ``nn.Linear`` whose inference forward multiplies by its weight in CSR form.

The weight stays a dense parameter holding its zeros (training, masks, counting, ONNX export and
the artifact see an ``nn.Linear``; the artifact stores it with a sparse encoding, so it is small
on disk and reloads bit-exactly). Under ``no_grad`` / ``inference_mode`` the forward runs
``torch.addmm(b, W_csr, x^T)^T`` on a CSR copy of the weight made on first use and kept until
the weight changes (its version or storage), so memory holds both forms. With gradients on, in
ONNX export, or for a dtype MKL's sparse BLAS does not take (anything but float32/float64), it
runs the dense ``F.linear``.

Whether that is faster depends on the sparsity, the shape and the CPU: on the machine of
BENCHMARKS.md ("Sparse execution") CSR beats the dense kernel only around 98% sparsity, and is
2-6x slower at 80-90%. The ``sparse`` runtime (:mod:`torchslim.runtime`) converts a linear layer
only where it measured CSR faster.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import register_module_class

#: dtypes the CSR product runs in (MKL sparse BLAS on CPU)
CSR_DTYPES = (torch.float32, torch.float64)


@register_module_class
class SparseLinear(nn.Linear):
    """``nn.Linear`` computing ``y = x W^T + b`` with ``W`` in CSR form at inference.

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``; ``weight`` is ``[out_features, in_features]``.
    bias : bool, default=True

    Notes
    -----
    Outputs equal ``nn.Linear``'s to float rounding (the sum runs in another order: about 1e-6
    relative in float32). Change the weight through its parameter (in-place ops bump its
    version); writing through ``.data`` is not seen, as for :class:`~torchslim.layers.QuantLinear`.

    Examples
    --------
    >>> lin = nn.Linear(8, 3)
    >>> with torch.no_grad():
    ...     _ = lin.weight.masked_fill_(lin.weight.abs() < 0.3, 0.0)
    >>> sparse = SparseLinear.from_linear(lin)
    >>> x = torch.randn(2, 8)
    >>> with torch.inference_mode():
    ...     bool(torch.allclose(sparse(x), lin(x), atol=1e-6))
    True
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        """A SparseLinear sharing ``linear``'s weight and bias tensors (same device, dtype and mode)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None)

    def csr_weight(self) -> torch.Tensor:
        """The weight as a ``sparse_csr`` tensor, made once per change of the weight."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        cache = self.__dict__.get("_csr")
        if cache is None or cache[0] != key:
            with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                cache = self.__dict__["_csr"] = (key, w.detach().to_sparse_csr())
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()) or torch.onnx.is_in_onnx_export() \
                or self.weight.dtype not in CSR_DTYPES or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)                            # (B, in)
        csr = self.csr_weight()
        out = (torch.sparse.mm(csr, rows.t()) if self.bias is None
               else torch.addmm(self.bias[:, None], csr, rows.t()))      # (out, B)
        return out.t().reshape(*x.shape[:-1], self.out_features)

    def train(self, mode: bool = True) -> "SparseLinear":
        self.__dict__.pop("_csr", None)
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_csr", None)
        super()._load_from_state_dict(*args, **kwargs)
