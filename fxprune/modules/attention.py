"""``PrunedMultiheadAttention``: an ``nn.MultiheadAttention`` whose query, inner and output widths differ.

``nn.MultiheadAttention`` ties four widths together: the query input, ``embed_dim``,
``num_heads * head_dim`` and the out projection's output, and uses the scale
``1/sqrt(head_dim)``. Pruning heads (inner width) separately from the residual
stream (query input and output), or pruning head dims (which must keep the
original scale), breaks the tie. This subclass keeps the parameter layout and
names of its parent (``in_proj_weight`` packed when q, k and v share the input
width, else ``q/k/v_proj_weight``; ``in_proj_bias``; ``out_proj``) with::

    in_proj_weight  (3 * num_heads * head_dim, embed_dim)
    out_proj.weight (out_dim, num_heads * head_dim)

Its forward is one fused in-projection GEMM when ``query is key is value`` (two
when only ``key is value``), ``F.scaled_dot_product_attention`` (explicit
softmax when ``need_weights``), and the out projection. Supported as in
:mod:`fxprune.analysis.decompose`: batched 3-d inputs, ``batch_first`` both ways, a 2-d
``attn_mask``, ``key_padding_mask``, ``need_weights`` both ways.

Example::

    >>> m = PrunedMultiheadAttention(embed_dim=768, num_heads=6, head_dim=64, batch_first=True)
    >>> x = torch.randn(1, 197, 768)
    >>> m(x, x, x, need_weights=False)[0].shape
    torch.Size([1, 197, 768])

``fxprune.save``/``load`` and ``torch.save`` handle it like any module; capture keeps it a leaf, so a re-analysed
pruned model (iterative pruning) decomposes and recomposes it again.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear


def merge_masks(attn_mask, key_padding_mask, dtype: torch.dtype):
    """One additive float mask of shape (B or 1, 1, L or 1, S) from MHA's two optional masks."""
    merged = None
    for mask, view in ((attn_mask, lambda m: m.reshape(1, 1, *m.shape[-2:])),
                       (key_padding_mask, lambda m: m.reshape(m.shape[0], 1, 1, m.shape[-1]))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        mask = view(mask.to(dtype))
        merged = mask if merged is None else merged + mask
    return merged


torch.fx.wrap("merge_masks")  # one call in a traced forward: it branches on the masks' dtypes


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its own ``head_dim``, output width ``out_dim`` and ``scale``.

    ``embed_dim`` is the query's input width (as in the parent), ``kdim``/``vdim``
    the key's and value's; ``scale=None`` is ``1/sqrt(head_dim)``.
    ``packed_in_proj`` (default: q, k and v share the input width) chooses
    ``in_proj_weight`` over ``q/k/v_proj_weight``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, out_dim: int | None = None,
                 kdim: int | None = None, vdim: int | None = None, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, scale: float | None = None, packed_in_proj: bool | None = None,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.out_dim = embed_dim if out_dim is None else out_dim
        self._qkv_same_embed_dim = (self.kdim == embed_dim and self.vdim == embed_dim) if packed_in_proj is None \
            else bool(packed_in_proj)
        self.dropout, self.batch_first, self.scale = dropout, batch_first, scale
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        inner = num_heads * head_dim
        if self._qkv_same_embed_dim:
            if not self.kdim == self.vdim == embed_dim:
                raise ValueError(f"a packed in_proj_weight needs embed_dim == kdim == vdim, got "
                                 f"{embed_dim}, {self.kdim}, {self.vdim}")
            self.in_proj_weight = nn.Parameter(torch.empty((3 * inner, embed_dim), **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty((inner, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((inner, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((inner, self.vdim), **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(inner, self.out_dim, bias=bias, **factory)
        self._reset_parameters()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out_dim={self.out_dim}, kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}"
                + (f", scale={self.scale}" if self.scale is not None else ""))

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        """As ``nn.MultiheadAttention.forward`` for batched inputs and a 2-d ``attn_mask``.

        ``is_causal`` is a hint, as in the parent: ``attn_mask`` must be given.
        """
        if is_causal and attn_mask is None:  # (no checks on tensor values: torch.fx can trace this forward)
            raise RuntimeError("is_causal is a hint: pass the causal attn_mask too (as nn.MultiheadAttention needs)")
        self_attention, shared_kv = query is key and key is value, key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        mask = None
        if attn_mask is not None or key_padding_mask is not None:
            mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scale = 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale
            scores = torch.matmul(q * scale, k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            probs = F.softmax(scores, dim=-1)
            if p:
                probs = F.dropout(probs, p=p, training=True)
            out = torch.matmul(probs, v)
            weights = probs.mean(1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        out = F.linear(out.transpose(1, 2).flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value, self_attention: bool, shared_kv: bool):
        """q, k, v in as few GEMMs as the inputs allow (one for self-attention with a packed weight)."""
        inner = self.num_heads * self.head_dim
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:
                return F.linear(query, w, b).split(inner, dim=-1)
            if shared_kv:
                q = F.linear(query, w[:inner], None if b is None else b[:inner])
                return (q, *F.linear(key, w[inner:], None if b is None else b[inner:]).split(inner, dim=-1))
            weights = w.split(inner)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None, None, None) if b is None else b.split(inner)
        return tuple(F.linear(x, w, bias) for x, w, bias in zip((query, key, value), weights, biases))
