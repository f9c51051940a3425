"""Ops the benchmark zoo (benchmarks/coverage.py) met without a rule: in-place aten activations, grid sampling,
scans as methods, and timm's attention-mask helpers.

Each had frozen axes that a rule elsewhere already describes:

* ``torch.export`` keeps in-place activations as their own aten ops (``aten.silu_``,
  ``aten.hardswish_``: MobileViT, EfficientViT) and RAFT's ``aten.detach_``: elementwise;
* ``aten.grid_sampler`` (RAFT's correlation lookup): channels follow, sampled positions are spatial,
  like ``F.grid_sample``;
* ``x.cumsum(dim)`` as a method (EdgeNeXt's positional encoding): the aten scan rule;
* timm's ``maybe_add_mask(scores, mask)`` and ``resolve_self_attn_mask(n, attn, mask, causal)``,
  hidden from tracing with ``torch.fx.wrap`` in every timm ViT: without them the attention
  scores froze the heads.

Example: in timm's ViT, ``attn = maybe_add_mask(q @ k.transpose(-2, -1), None)`` ties
``attn[1]`` (heads) to the scores' heads, so the heads of ``qkv.weight[0]`` (``product(3, heads,
head_dim)``) are prunable again; ``resolve_self_attn_mask(197, attn, None, False)`` returns None
and relates nothing.
"""

from __future__ import annotations

import torch

from fxprune.rules import aten as aten_rules
from fxprune.rules.elementwise import elementwise
from fxprune.rules.registry import RULES, family, register
from fxprune.rules.spatial import interpolate

aten = torch.ops.aten

# In-place aten forms of ops whose functional forms are elementwise. Another table may cover some of them
# already (a later aten addition); those keep their rule rather than making this import fail.
_INPLACE = ("hardswish_", "silu_", "relu_", "gelu_", "sigmoid_", "hardsigmoid_", "leaky_relu_", "hardtanh_",
            "elu_", "tanh_", "mish_", "clamp_min_", "clamp_max_", "detach_")
family(elementwise, *[op for op in aten_rules.overloads(*aten_rules._packets(*_INPLACE)) if op not in RULES])

family(interpolate, *aten_rules.overloads(*aten_rules._packets("grid_sampler", "grid_sampler_2d",
                                                               "grid_sampler_3d")))

family(aten_rules.scan, "cumsum", "cumprod", torch.cumsum, torch.cumprod)

# Registered by name, so that ``import fxprune`` does not import timm (~1.8 s).
family(elementwise, "timm.layers.attention:maybe_add_mask")


@register("timm.layers.attention:resolve_self_attn_mask")
def resolve_self_attn_mask(r) -> None:
    """The additive bias is the mask itself (or built from it): same axes; None (no mask) relates nothing.

    A causal bias is a fresh ``(n, n)`` tensor over sequence positions, which are never pruned.
    """
    out = r.out
    if out is None:
        return
    mask = r.tensor(r.node.args[2]) if len(r.node.args) > 2 else r.tensor(r.node.kwargs.get("attn_mask"))
    if mask is not None and mask.shape == out.shape:
        for d in range(out.ndim):
            r.same(mask[d], out[d])
        return
    for d in range(out.ndim):
        r.freeze(out[d], "sequence positions of an attention bias")
