"""Scaled dot-product attention, and nn.MultiheadAttention when it could not be decomposed.

``sdpa(q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev))`` ties the head axes of
q, k, v and out, q/k's ``E`` (the contraction) and v/out's ``Ev``. With
``enable_gqa=True`` the query head axis is ``product(kv_heads, R)``. Pruning
``E`` would change the default scale ``1/sqrt(E)``, so the rewrite pins the
original scale as an explicit argument. ``E`` and ``Ev`` are marked as head dims
(``r.head_dim``): kept whole unless the caller asks for ``prune_head_dims=True``.

GQA goes through ``enable_gqa``.
"""

from __future__ import annotations

import math

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.algebra.context import TensorRef
from fxprune.rules.registry import register


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    pass


@register(F.scaled_dot_product_attention)
def scaled_dot_product_attention(r) -> None:
    a = r.bind(_sdpa_signature)
    q, k, v, out, mask = a["query"], a["key"], a["value"], r.out, a["attn_mask"]
    r.same(q[-1], k[-1])
    r.same(v[-1], out[-1])
    r.head_dim(q[-1])
    r.head_dim(v[-1])
    r.same(q[-2], out[-2])
    r.same(k[-2], v[-2])
    for i in range(3, q.ndim + 1):
        r.same(q[-i], out[-i])
        if k.ndim >= i:
            r.same(k[-i], v[-i])
            if k.shape[-i] == q.shape[-i]:
                r.same(k[-i], q[-i])
            elif i == 3 and a["enable_gqa"] and k.shape[-i] > 0 and q.shape[-i] % k.shape[-i] == 0:
                r.product(q[-i], [k[-i], r.fresh(q.shape[-i] // k.shape[-i], f"GQA rank {r.where}")])
    if isinstance(mask, TensorRef):
        if mask.shape[-1] == k.shape[-2]:
            r.same(mask[-1], k[-2])
        if mask.ndim >= 2 and mask.shape[-2] == q.shape[-2]:
            r.same(mask[-2], q[-2])
        for i in range(3, min(mask.ndim, out.ndim) + 1):
            if mask.shape[-i] == out.shape[-i]:
                r.same(mask[-i], out[-i])
    if a["scale"] is None:
        r.on_rewrite(_pin_scale(q[-1], q.shape[-1]))


def _pin_scale(head_dim_axis, head_dim: int):
    def hook(node: fx.Node, sizes) -> None:
        if sizes.new(head_dim_axis) != head_dim:
            node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(head_dim)}

    return hook


@register(nn.MultiheadAttention)
def multihead_attention(r) -> None:
    """Reached only for configurations the decomposition pass leaves alone (bias_k, add_zero_attn ...)."""
    r.freeze_all("nn.MultiheadAttention with a configuration fxprune does not decompose")
