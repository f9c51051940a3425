"""Normalisations: BatchNorm, InstanceNorm, LayerNorm, RMSNorm, GroupNorm, and PReLU's per-channel slope.

Example: ``GroupNorm(2, 8)`` states ``x[1] = product(NG, Cg)`` with ``NG`` of 2
units: removing a unit of ``NG`` drops a whole group (``num_groups`` shrinks),
removing a unit of ``Cg`` drops one channel in every group.

Also ``_weight_norm`` (``v``'s axes; ``g`` on ``dim``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.algebra.context import TensorRef
from fxprune.rules.registry import register


def _same_shape(r, x, out) -> None:
    for d in range(x.ndim):
        r.same(x[d], out[d])


def _batch_norm_signature(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: A002
                          momentum=0.1, eps=1e-5):
    pass


def _instance_norm_signature(input, running_mean=None, running_var=None, weight=None, bias=None,  # noqa: A002
                             use_input_stats=True, momentum=0.1, eps=1e-5):
    pass


def _per_channel(r, a) -> None:
    x, out = a["input"], r.out
    _same_shape(r, x, out)
    ch = 1 if x.ndim > 1 else 0
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = a.get(name)
        if isinstance(t, TensorRef) and t.ndim == 1:
            r.same(t[0], x[ch])
    r.module_attr("num_features", x[ch])


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, F.batch_norm, torch.batch_norm)
def batch_norm(r) -> None:
    _per_channel(r, r.bind(_batch_norm_signature))


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm)
def instance_norm(r) -> None:
    _per_channel(r, r.bind(_instance_norm_signature))


def _layer_norm_signature(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002
    pass


@register(nn.LayerNorm, F.layer_norm, nn.RMSNorm, F.rms_norm)
def layer_norm(r) -> None:
    a = r.bind(_layer_norm_signature)
    x, out = a["input"], r.out
    _same_shape(r, x, out)
    shape = a["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    for name in ("weight", "bias"):
        t = a.get(name)
        if isinstance(t, TensorRef):
            for i in range(t.ndim):
                r.same(t[i], x[x.ndim - t.ndim + i])
    for i in range(k):
        r.normalizes(x[x.ndim - k + i])
    r.const("normalized_shape", x[-1] if isinstance(shape, int) else [x[x.ndim - k + i] for i in range(k)])


def _group_norm_signature(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002
    pass


@register(nn.GroupNorm, F.group_norm)
def group_norm(r) -> None:
    a = r.bind(_group_norm_signature)
    x, out = a["input"], r.out
    _same_shape(r, x, out)
    groups = int(a["num_groups"])
    ng = r.fresh(groups, f"norm groups {r.where}")
    per_group = r.fresh(x.shape[1] // groups, f"channels per norm group {r.where}")
    r.product(x[1], [ng, per_group])
    r.normalizes(per_group)
    for name in ("weight", "bias"):
        t = a.get(name)
        if isinstance(t, TensorRef):
            r.same(t[0], x[1])
    r.const("num_groups", ng)
    r.module_attr("num_channels", x[1])


def _prelu_signature(input, weight):  # noqa: A002
    pass


@register(nn.PReLU, F.prelu, torch.prelu)
def prelu(r) -> None:
    a = r.bind(_prelu_signature)
    x, w, out = a["input"], a["weight"], r.out
    _same_shape(r, x, out)
    if w.shape[0] > 1:
        r.same(w[0], x[1 if x.ndim > 1 else 0])
        r.module_attr("num_parameters", w[0])


def _weight_norm_signature(v, g, dim=0):
    pass


@register(torch._weight_norm)
def weight_norm(r) -> None:
    """``v * g / ||v||`` (norm over every axis but ``dim``; ``dim=-1``: the whole tensor) has ``v``'s axes.

    ``g`` keeps ``v``'s size on ``dim`` (1 elsewhere). The norm is not a normalisation in the
    oracle's sense: zero units add nothing to it.
    """
    a = r.bind(_weight_norm_signature)
    v, g, out = a["v"], a["g"], r.out
    for d in range(v.ndim):
        r.same(v[d], out[d])
    if isinstance(g, TensorRef) and g.ndim == v.ndim:
        for d in range(v.ndim):
            if g.shape[d] == v.shape[d]:
                r.same(g[d], v[d])
