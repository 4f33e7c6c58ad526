"""Attention layers with fewer heads than their width: what head pruning puts in place.

``nn.MultiheadAttention`` packs q/k/v into one ``in_proj_weight`` and derives the head size from
``embed_dim // num_heads``; torchvision's Swin attention derives it from the input width. Neither
can hold 9 heads of 64 at width 768, so head pruning replaces them with these classes, whose
inner width ``num_heads * head_dim`` is free. Their weights are ordinary ``nn.Linear`` children
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; ``qkv``, ``proj``), so weight pruning,
quantization and measurement treat them like any other Linear, and ``params`` counts them
without a ``slim_weights()`` declaration.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import register_module_class


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as an additive float mask; a float mask as is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


@register_module_class
class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` at width ``embed_dim``,
    called and answering like ``nn.MultiheadAttention`` (``(attn_output, weights or None)``).

    Shapes: query (B, L, E) with ``batch_first`` else (L, B, E), or unbatched (L, E); key and
    value (B, S, kdim/vdim) likewise; ``attn_mask`` (L, S) or (B * num_heads, L, S), boolean
    (True = not attended) or additive float; ``key_padding_mask`` (B, S). Output (B, L, E); with
    ``need_weights`` the softmax weights (B, L, S), averaged over heads unless
    ``average_attn_weights=False`` (B, num_heads, L, S). Scores are scaled by
    ``1 / sqrt(head_dim)`` (Vaswani et al. 2017, eq. 1) as in the layer it replaces.

    ``nn.TransformerEncoderLayer`` reads ``in_proj_bias`` to choose its fused path; ``None``
    here sends it through its plain path, which calls this forward.

    Examples
    --------
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
    >>> small = PrunedMultiheadAttention.from_attention(mha, keep=[0, 2, 3])
    >>> small.num_heads, small.q_proj.weight.shape
    (3, torch.Size([12, 16]))
    >>> small(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))[0].shape
    torch.Size([2, 5, 16])
    """

    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def rebuild_args(self) -> dict[str, Any]:
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_dim,
                    bias=self.q_proj.bias is not None, dropout=self.dropout, batch_first=self.batch_first,
                    kdim=self.kdim, vdim=self.vdim)

    @classmethod
    def from_attention(cls, m: nn.Module, keep: list[int]) -> "PrunedMultiheadAttention":
        """The heads ``keep`` (indices, in order) of ``m``: an ``nn.MultiheadAttention`` without
        ``bias_k``/``add_zero_attn``, or a PrunedMultiheadAttention; weights copied, same
        device, dtype and train/eval mode."""
        q, k, v, o = attention_projections(m)
        rows = head_rows(keep, m.head_dim)
        new = cls(m.embed_dim, len(keep), m.head_dim, bias=q.bias is not None, dropout=float(m.dropout),
                  batch_first=m.batch_first, kdim=m.kdim, vdim=m.vdim)
        new.to(device=o.weight.device, dtype=o.weight.dtype)
        with torch.no_grad():
            for lin, src in zip((new.q_proj, new.k_proj, new.v_proj), (q, k, v)):
                lin.weight.copy_(src.weight[rows])
                if src.bias is not None:
                    lin.bias.copy_(src.bias[rows])
            new.out_proj.weight.copy_(o.weight[:, rows])
            if o.bias is not None:
                new.out_proj.bias.copy_(o.bias)
        return new.train(m.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, length, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, length, h, d).transpose(1, 2)     # (B, h, L, d)
        k = self.k_proj(key).view(b, src, h, d).transpose(1, 2)          # (B, h, S, d)
        v = self.v_proj(value).view(b, src, h, d).transpose(1, 2)        # (B, h, S, d)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(b, h, length, src)
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.view(b, 1, 1, src)
            mask = pad if mask is None else mask + pad
        if is_causal and mask is None:
            mask = _additive(torch.ones(length, src, dtype=torch.bool, device=q.device).triu(1), q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)                 # (B, h, L, S)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p, self.training) @ v                  # (B, h, L, d)
            if average_attn_weights:
                weights = weights.mean(dim=1)                               # (B, L, S)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, h * d))  # (B, L, E)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, heads={self.num_heads}, head_dim={self.head_dim}"


class _Projection:
    """A view of one projection as ``weight`` (rows out, columns in) and ``bias``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias


def attention_projections(m: nn.Module) -> tuple[_Projection, _Projection, _Projection, _Projection]:
    """(q, k, v, out) projections of an ``nn.MultiheadAttention`` (packed or separate weights)
    or a PrunedMultiheadAttention: q/k/v weights (num_heads * head_dim, in), out (E, num_heads * head_dim)."""
    if isinstance(m, PrunedMultiheadAttention):
        q, k, v = (_Projection(lin.weight, lin.bias) for lin in (m.q_proj, m.k_proj, m.v_proj))
    else:
        weights = (m.in_proj_weight.chunk(3) if m._qkv_same_embed_dim
                   else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
        biases = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
        q, k, v = (_Projection(w, b) for w, b in zip(weights, biases))
    return q, k, v, _Projection(m.out_proj.weight, m.out_proj.bias)


def head_rows(keep: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of heads ``keep`` in a (heads * head_dim, ...) projection.

    >>> head_rows([0, 2], 2).tolist()
    [0, 1, 4, 5]
    """
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])


@register_module_class
class PrunedShiftedWindowAttention(nn.Module):
    """torchvision's Swin ``ShiftedWindowAttention`` (Liu et al. 2021, W-MSA/SW-MSA with a
    relative position bias) with ``num_heads`` heads of ``head_dim`` at width ``dim``.

    Input and output (B, H, W, dim), as the layer it replaces; ``qkv``: Linear(dim, 3 * num_heads
    * head_dim), ``proj``: Linear(num_heads * head_dim, dim), ``relative_position_bias_table``:
    ((2 * Wh - 1) * (2 * Ww - 1), num_heads). The computation is torchvision's
    ``shifted_window_attention`` with the head size taken from ``head_dim`` instead of
    ``dim // num_heads``.
    """

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int, head_dim: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        super().__init__()
        self.dim, self.head_dim = dim, head_dim
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.attention_dropout, self.dropout = num_heads, attention_dropout, dropout
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))  # (2Wh-1)(2Ww-1), nH
        ShiftedWindowAttention.define_relative_position_index(self)  # buffer relative_position_index

    def rebuild_args(self) -> dict[str, Any]:
        return dict(dim=self.dim, window_size=self.window_size, shift_size=self.shift_size,
                    num_heads=self.num_heads, head_dim=self.head_dim, qkv_bias=self.qkv.bias is not None,
                    proj_bias=self.proj.bias is not None, attention_dropout=self.attention_dropout,
                    dropout=self.dropout)

    @classmethod
    def from_attention(cls, m: nn.Module, keep: list[int]) -> "PrunedShiftedWindowAttention":
        """The heads ``keep`` of a ``ShiftedWindowAttention`` (v1) or PrunedShiftedWindowAttention."""
        dim = m.qkv.in_features
        head_dim = getattr(m, "head_dim", dim // m.num_heads)
        inner = m.num_heads * head_dim
        rows = head_rows(keep, head_dim)
        new = cls(dim, m.window_size, m.shift_size, len(keep), head_dim, m.qkv.bias is not None,
                  m.proj.bias is not None, m.attention_dropout, m.dropout)
        new.to(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)
        qkv_rows = torch.cat([rows + i * inner for i in range(3)])  # q, k, v blocks of the packed rows
        with torch.no_grad():
            new.qkv.weight.copy_(m.qkv.weight[qkv_rows])
            if m.qkv.bias is not None:
                new.qkv.bias.copy_(m.qkv.bias[qkv_rows])
            new.proj.weight.copy_(m.proj.weight[:, rows])
            if m.proj.bias is not None:
                new.proj.bias.copy_(m.proj.bias)
            new.relative_position_bias_table.copy_(m.relative_position_bias_table[:, keep])
        return new.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.swin_transformer import _get_relative_position_bias

        bias = _get_relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                           self.window_size)                  # (1, nH, N, N)
        b, height, width, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
        _, ph, pw, _ = x.shape
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (ph // wh) * (pw // ww)
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, wh * ww, c)
        n, h, d = wh * ww, self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b * windows, n, 3, h, d).permute(2, 0, 3, 1, 4)  # 3, (B*nW, h, N, d)
        q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1) + bias                                       # (B*nW, h, N, N)
        if sum(shift) > 0:
            attn = (attn.view(b, windows, h, n, n) + _shift_mask(x, ph, pw, self.window_size, shift)).view(-1, h, n, n)
        attn = F.dropout(attn.softmax(dim=-1), self.attention_dropout, self.training)
        x = self.proj((attn @ v).transpose(1, 2).reshape(b * windows, n, h * d))  # (B*nW, N, dim)
        x = F.dropout(x, self.dropout, self.training)
        x = x.view(b, ph // wh, pw // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()

    def extra_repr(self) -> str:
        return f"{self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, window={self.window_size}"


def _shift_mask(x: torch.Tensor, ph: int, pw: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """(1, nW, 1, N, N) additive mask (-100 between tokens from different regions of a shifted
    window), as torchvision builds it."""
    regions = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    regions = regions.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])                           # (nW, N)
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0).unsqueeze(1).unsqueeze(0)
