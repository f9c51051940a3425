"""Elementwise ops: every input axis that is not broadcast is the output axis.

Example: ``x (B, C, H, W) + bias (1, C, 1, 1)`` ties ``bias[1]`` to ``x[1]`` and
``out[1]``; the size-1 axes of ``bias`` broadcast and stay unrelated.

Also: activations, dropout, identity, casts, ``*_like``; softmax and normalize (they mark their dim normalised);
GLU; triu/tril (tied leading axes, the last two frozen: position masks).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import family, register


def tie_broadcast(r, out, tensors) -> None:
    """Align every tensor with ``out`` from the right; equal sizes are the same axis."""
    for t in tensors:
        for i in range(1, min(t.ndim, out.ndim) + 1):
            if t.shape[-i] == out.shape[-i]:
                r.same(t[-i], out[-i])


def elementwise(r) -> None:
    outs = r.tensors_out()
    if not outs:
        return
    for out in outs:
        tie_broadcast(r, out, r.tensors_in() + r.module_tensors())


family(
    elementwise,
    # arithmetic, as operators, functions and methods (in-place forms too)
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.exp,
    torch.log, torch.abs, torch.square, torch.reciprocal, torch.sign, torch.erf, torch.clamp, torch.clip,
    torch.where, torch.maximum, torch.minimum, torch.lerp, torch.addcmul, torch.addcdiv, torch.masked_fill,
    torch.cos, torch.sin, torch.floor, torch.ceil, torch.round, torch.true_divide, torch.rsub,
    torch.log1p, torch.expm1, torch.exp2, torch.log2, torch.trunc, torch.nan_to_num, torch.fmod, torch.remainder,
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "abs", "square", "reciprocal",
    "sign", "erf", "clamp", "clip", "clamp_min", "clamp_max", "masked_fill", "where", "lerp", "cos", "sin",
    "add_", "sub_", "mul_", "div_", "clamp_", "masked_fill_", "neg_", "floor", "ceil", "round", "fill_", "zero_",
    "log1p", "expm1", "exp2", "log2", "trunc", "nan_to_num", "fmod", "remainder",
    # comparisons and logic: a mask has its operands' axes (masks feed where / masked_fill)
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, torch.logical_and,
    torch.logical_or, torch.logical_xor, torch.logical_not, torch.isnan, torch.isinf, torch.isfinite,
    "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or", "logical_xor", "logical_not", "isnan", "isinf",
    "isfinite",
    # activations (module, function and method forms share this rule)
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Hardtanh,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.softsign, F.hardtanh, F.logsigmoid,
    F.relu_, F.threshold, F.hardshrink, F.softshrink, F.tanhshrink,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    "relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_",
    # regularisation and identity-like ops
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.clone, torch.detach, torch.nn.functional.hardtanh_,
    "contiguous", "clone", "detach", "requires_grad_",
    # *_like factories follow the shape of their input
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
)


def cast(r) -> None:
    """Casts and moves keep ``self``'s axes. A tensor argument (``x.to(y)``, ``x.type_as(y)``) lends only its
    dtype or device, so tying its axes (as ``elementwise`` would, by equal sizes) could merge unrelated groups.

    Example: ``h (B, 8).type_as(ids (B, 8))`` ties ``out[1]`` to ``h[1]`` only; ``ids[1]`` stays its own axis.
    """
    x, out = r.input(0), r.out
    if x is None or out is None:
        return
    if x.shape != out.shape:  # never expected; an unrelated output axis must not be pruned on its own
        r.freeze_all("cast that changes the shape")
        return
    for d in range(x.ndim):
        r.same(x[d], out[d])


family(cast, "float", "half", "double", "bfloat16", "bool", "long", "int", "to", "type", "type_as", "cpu", "cuda")


def _glu_signature(input, dim=-1):  # noqa: A002 - the name torch uses
    pass


@register(nn.GLU, F.glu)
def glu(r) -> None:
    """GLU halves an axis: ``out = a * sigmoid(b)`` where ``x = cat(a, b)``; a and b are one axis."""
    a = r.bind(_glu_signature)
    x, out, dim = a["input"], r.out, a["dim"]
    for d in range(x.ndim):
        if d != dim % x.ndim:
            r.same(x[d], out[d])
    r.concat(x[dim], [out[dim], out[dim]])


def _softmax_signature(input, dim=None, *args, **kwargs):  # noqa: A002
    pass


@register(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin, torch.softmax,
          torch.log_softmax, "softmax", "log_softmax")
def softmax(r) -> None:
    """Elementwise in shape, but normalised over ``dim``: pruning that axis is not exact."""
    elementwise(r)
    a = r.bind(_softmax_signature)
    x = a["input"]
    if isinstance(a["dim"], int) and x.ndim:
        r.normalizes(x[a["dim"]])


def _normalize_signature(input, p=2.0, dim=1, eps=1e-12, out=None):  # noqa: A002
    pass


@register(F.normalize)
def normalize(r) -> None:
    elementwise(r)
    a = r.bind(_normalize_signature)
    r.normalizes(a["input"][a["dim"]])


@register(torch.triu, torch.tril, "triu", "tril")
def triangular(r) -> None:
    """``triu`` / ``tril`` keep each element by its position on the last two axes (a causal mask): the
    other axes are elementwise; the last two keep all their units, or the diagonal would move."""
    x, out = r.input(0), r.out
    for d in range(x.ndim):
        r.same(x[d], out[d])
    for d in (-1, -2):
        r.freeze(out[d], "triu/tril select elements by their position on this axis")
