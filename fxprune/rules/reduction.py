"""Reductions: the reduced axes disappear (or become size 1), the others carry over.

Example: ``x (B, C, H, W).mean((2, 3))`` ties ``out[0]`` to ``x[0]`` and
``out[1]`` to ``x[1]``; H and W are simply gone.

Covered: sum/mean/amax/... (mean/std/var mark their dims normalised), norm.
"""

from __future__ import annotations

import torch

from fxprune.algebra.context import TensorRef
from fxprune.rules.elementwise import elementwise
from fxprune.rules.registry import family, op_name, register


_AVERAGES = {"mean", "std", "var", "nanmean", "logsumexp", "norm"}


def _reduction_signature(input, dim=None, keepdim=False, *args, **kwargs):  # noqa: A002
    pass


def reduction(r) -> None:
    a = r.bind(_reduction_signature)
    x = a["input"]
    dims = a["dim"]
    if isinstance(dims, TensorRef):  # torch.max(a, b) and friends are elementwise
        elementwise(r)
        return
    if dims is None or not isinstance(dims, (int, tuple, list)):
        return  # a full reduction: the output has no axis of x
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)} if x.ndim else set()
    if op_name(r.node.target) in _AVERAGES:
        for d in dims:
            r.normalizes(x[d])
    for out in r.tensors_out():
        kept = [d for d in range(x.ndim) if d not in dims] if out.ndim < x.ndim else list(range(x.ndim))
        for i, d in enumerate(kept):
            if i < out.ndim and d not in dims:
                r.same(x[d], out[i])


family(
    reduction,
    torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.prod, torch.std, torch.var,
    torch.logsumexp, torch.argmax, torch.argmin, torch.all, torch.any, torch.nansum, torch.nanmean,
    "sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "argmax", "argmin",
    "all", "any", "nansum", "nanmean",
)


def _norm_signature(input, p="fro", dim=None, keepdim=False, *args, **kwargs):  # noqa: A002
    pass


@register(torch.norm, "norm")
def norm(r) -> None:
    """``x.norm(p, dim)``: a reduction whose dim comes after ``p``."""
    a = r.bind(_norm_signature)
    x, dims = a["input"], a["dim"]
    if dims is None:
        return
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    kept = [d for d in range(x.ndim) if d not in dims] if r.out.ndim < x.ndim else list(range(x.ndim))
    for i, d in enumerate(kept):
        if d not in dims:
            r.same(x[d], r.out[i])
