"""Ops that act on spatial axes and carry channels through: pooling, interpolation, padding, pixel shuffle.

Example: ``F.max_pool2d(x (B, C, H, W), 2)`` ties ``out[0:2]`` to ``x[0:2]`` and
freezes the spatial axes (they never have prunable units).

Also roll (no dims, or aten's ``[]``: every axis).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import family, register


def _pool(spatial: int):
    """A rule for ops whose last ``spatial`` axes are spatial and whose leading axes pass through."""

    def rule(r) -> None:
        x = r.input(0)
        for out in r.tensors_out():
            lead = x.ndim - spatial
            for d in range(lead):
                r.same(x[d], out[d])
            for d in range(lead, x.ndim):
                r.freeze(x[d], "spatial axis")
                r.freeze(out[d], "spatial axis")

    return rule


family(_pool(1), nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
       F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, torch.max_pool1d,
       torch.avg_pool1d, torch.adaptive_avg_pool1d, F.lp_pool1d)
family(_pool(2), nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
       nn.FractionalMaxPool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
       torch.max_pool2d, F.lp_pool2d)
family(_pool(3), nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d,
       F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, torch.max_pool3d)


def interpolate(r) -> None:
    """Resampling keeps batch and channel axes; every axis after them is spatial."""
    x, out = r.input(0), r.out
    for d in range(min(2, x.ndim)):
        r.same(x[d], out[d])
    for d in range(2, x.ndim):
        r.freeze(x[d], "spatial axis")
        r.freeze(out[d], "spatial axis")


family(interpolate, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, nn.Upsample,
       nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.grid_sample)


def _pad_signature(input, pad, mode="constant", value=None):  # noqa: A002
    pass


@register(F.pad, torch.constant_pad_nd)
def pad(r) -> None:
    a = r.bind(_pad_signature)
    _pad_axes(r, a["input"], r.out, list(a["pad"]))


@register(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
          nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
          nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
def pad_module(r) -> None:
    _pad_axes(r, r.input(0), r.out, list(r.module.padding))


def _pad_axes(r, x, out, amounts: list) -> None:
    padded = set()
    for k in range(0, len(amounts), 2):
        if amounts[k] != 0 or amounts[k + 1] != 0:
            padded.add(x.ndim - 1 - k // 2)
    for d in range(x.ndim):
        if d in padded:
            r.freeze(x[d], "padded axis")
            r.freeze(out[d], "padded axis")
        else:
            r.same(x[d], out[d])


@register(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(r) -> None:
    """(N, C*s*s, H, W) -> (N, C, H*s, W*s): the input channel axis is product(C, s, s), s frozen."""
    x, out = r.input(0), r.out
    s = int(round((x.shape[-3] // out.shape[-3]) ** 0.5))
    rows, cols = r.fresh(s), r.fresh(s)
    r.product(x[-3], [out[-3], rows, cols])
    for axis in (rows, cols, x[-2], x[-1], out[-2], out[-1]):
        r.freeze(axis, "pixel shuffle spatial factor")
    for d in range(x.ndim - 3):
        r.same(x[d], out[d])


@register(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(r) -> None:
    x, out = r.input(0), r.out
    s = int(round((out.shape[-3] // x.shape[-3]) ** 0.5))
    rows, cols = r.fresh(s), r.fresh(s)
    r.product(out[-3], [x[-3], rows, cols])
    for axis in (rows, cols, x[-2], x[-1], out[-2], out[-1]):
        r.freeze(axis, "pixel shuffle spatial factor")
    for d in range(x.ndim - 3):
        r.same(x[d], out[d])


def _roll_signature(input, shifts, dims=None):  # noqa: A002
    pass


@register(torch.roll, "roll")
def roll(r) -> None:
    """A roll permutes indices along its dims: those freeze, the others carry over.

    No dims (``None``, or aten's ``[]``) rolls the flattened tensor: every axis freezes.
    """
    a = r.bind(_roll_signature)
    x, out, dims = a["input"], r.out, a["dims"]
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    rolled = {d % x.ndim for d in dims} if dims else set(range(x.ndim))
    for d in range(x.ndim):
        if d in rolled:
            r.freeze(x[d], "rolled axis")
            r.freeze(out[d], "rolled axis")
        else:
            r.same(x[d], out[d])
