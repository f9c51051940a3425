"""Convolutions, with any ``groups``: channel axes are products (groups, channels per group).

Example: ``Conv2d(8, 8, 3, groups=2)`` states ``x[1] = product(G, w[1])`` and
``w[0] = out[1] = product(G, Co)`` with a fresh ``G`` of 2 units shared by both.
So either whole groups are removed (and ``groups`` shrinks), or the same
channel rank inside every group. Depthwise convs are the case ``w[1] = 1``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import register


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
    pass


def _conv_transpose_signature(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,  # noqa: A002
                              dilation=1, output_size=None):
    pass


def _channel_axes(r, x, out, w) -> int:
    """Tie batch dims, freeze kernel and spatial dims; return the channel dim of x/out."""
    ch = 1 if x.ndim == w.ndim else 0  # convs accept unbatched input
    if ch:
        r.same(x[0], out[0])
    for d in range(2, w.ndim):
        r.freeze(w[d], "convolution kernel")
    for d in range(ch + 1, x.ndim):
        r.freeze(x[d], "spatial axis")
        r.freeze(out[d], "spatial axis")
    return ch


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def conv(r) -> None:
    a = r.bind(_conv_signature)
    x, w, b, out = a["input"], a["weight"], a["bias"], r.out
    ch = _channel_axes(r, x, out, w)
    groups = int(a["groups"])
    g = r.fresh(groups, f"conv groups {r.where}")
    r.product(x[ch], [g, w[1]])
    r.product(w[0], [g, r.fresh(w.shape[0] // groups, f"conv channels per group {r.where}")])
    r.same(out[ch], w[0])
    if b is not None:
        r.same(b[0], w[0])
    r.const("groups", g)
    r.module_attr("in_channels", x[ch])
    r.module_attr("out_channels", out[ch])


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, F.conv_transpose1d, F.conv_transpose2d,
          F.conv_transpose3d)
def conv_transpose(r) -> None:
    a = r.bind(_conv_transpose_signature)
    x, w, b, out = a["input"], a["weight"], a["bias"], r.out
    ch = _channel_axes(r, x, out, w)
    groups = int(a["groups"])
    g = r.fresh(groups, f"conv groups {r.where}")
    r.product(x[ch], [g, r.fresh(w.shape[0] // groups, f"conv channels per group {r.where}")])
    r.same(w[0], x[ch])
    r.product(out[ch], [g, w[1]])
    if b is not None:
        r.same(b[0], out[ch])
    r.const("groups", g)
    r.module_attr("in_channels", x[ch])
    r.module_attr("out_channels", out[ch])
