"""Shape ops: reshape-like ops become products of axes, permutes map axes, expand adds broadcast axes.

Example: ``qkv.reshape(B, N, 3, H, D)`` from ``(B, N, 3*H*D)`` states
``qkv[2] = product(out[2], out[3], out[4])``; the reshape's ``H`` and ``D``
arguments are recorded as shape constants and rewritten after pruning.

Covered: view/reshape/flatten/unflatten/squeeze/unsqueeze (grouped products), permute/transpose/movedim,
``t``/``.T`` (aten ``numpy_T``), expand and ``broadcast_to`` (broadcast atoms), repeat (copy-major),
repeat_interleave (index-major: ``product(axis, copies)``), factories.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.algebra.context import TensorRef
from fxprune.algebra.layout import Prod
from fxprune.rules.registry import family, register


def tie_reshape(r, x, out) -> None:
    """Group dims of equal running product and relate each group as a product."""
    if 0 in x.shape or 0 in out.shape:
        r.freeze_all("reshape of an empty tensor")
        return
    i = j = 0
    while i < x.ndim or j < out.ndim:
        if i < x.ndim and x.shape[i] == 1:
            i += 1
            continue
        if j < out.ndim and out.shape[j] == 1:
            j += 1
            continue
        if i >= x.ndim or j >= out.ndim:
            break
        gi, gj = [i], [j]
        pi, pj = x.shape[i], out.shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= x.shape[i]
                i += 1
            else:
                gj.append(j)
                pj *= out.shape[j]
                j += 1
        r.same(Prod(tuple(x[d] for d in gi)), Prod(tuple(out[d] for d in gj)))


def _shape_layouts(r, out, shape) -> list:
    """Layouts for the entries of a shape argument; -1 entries are kept as they are."""
    return [None if (isinstance(s, int) and s == -1) else out[d] for d, s in enumerate(shape)]


def _follows_a_shape(r, shape, out) -> bool:
    """``x.view(y.shape)``: one argument that holds a whole shape, read from ``y`` at run time.

    Such a value follows ``y`` by itself, so there is no constant to rewrite; instead ``out``'s
    axes are tied to ``y``'s (the algebra has no relation weaker than ``same`` for "equal sizes").
    A whole shape from anywhere else freezes ``out``. Returns False for ordinary size arguments
    (ints, int nodes such as ``x.size(0)``, literal tuples), which are shape constants.
    """
    value = shape[0] if isinstance(shape, (tuple, list)) and len(shape) == 1 else shape
    if not (isinstance(value, fx.Node) and isinstance(value.meta.get("val"), (tuple, list, torch.Size))):
        return False
    source = None
    if value.op == "call_function" and value.target is getattr and value.args[1] == "shape":
        source = r.tensor(value.args[0])
    elif value.op == "call_method" and value.target == "size" and len(value.args) == 1 and not value.kwargs:
        source = r.tensor(value.args[0])
    if source is not None and source.shape == out.shape:
        for d in range(out.ndim):
            r.same(out[d], source[d])
    else:
        r.freeze(out, "shape computed at run time")
    return True


def _view_signature(self, *shape):
    pass


@register("view", "reshape")
def view(r) -> None:
    a = r.bind(_view_signature)
    tie_reshape(r, a["self"], r.out)
    shape = a["shape"]
    if _follows_a_shape(r, shape, r.out):
        return
    nested = len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size))
    r.const("shape", _shape_layouts(r, r.out, shape[0] if nested else shape), index=0 if nested else None)


def _reshape_signature(input, shape):  # noqa: A002
    pass


@register(torch.reshape)
def reshape(r) -> None:
    a = r.bind(_reshape_signature)
    tie_reshape(r, a["input"], r.out)
    if not _follows_a_shape(r, a["shape"], r.out):
        r.const("shape", _shape_layouts(r, r.out, a["shape"]))


def _view_as_signature(self, other):
    pass


@register("view_as", "reshape_as")
def view_as(r) -> None:
    a = r.bind(_view_as_signature)
    tie_reshape(r, a["self"], r.out)
    for d in range(r.out.ndim):
        r.same(a["other"][d], r.out[d])


def reshape_family(r) -> None:
    """flatten / squeeze / unsqueeze / nn.Flatten: no size constants, only a reshape."""
    tie_reshape(r, r.input(0), r.out)


family(reshape_family, torch.flatten, "flatten", nn.Flatten, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze",
       torch.ravel, "ravel")


def _unflatten_signature(input, dim, sizes):  # noqa: A002
    pass


def _unflatten_module_signature(input, dim, unflattened_size):  # noqa: A002
    pass


@register(torch.unflatten, "unflatten")
def unflatten(r) -> None:
    a = r.bind(_unflatten_signature)
    x, out = a["input"], r.out
    tie_reshape(r, x, out)
    dim = a["dim"] % x.ndim
    if not _follows_a_shape(r, a["sizes"], out):
        r.const("sizes", _shape_layouts(r, out, [None] * dim + list(a["sizes"]))[dim:])


@register(nn.Unflatten)
def unflatten_module(r) -> None:
    a = r.bind(_unflatten_module_signature)
    x, out = a["input"], r.out
    tie_reshape(r, x, out)
    dim = a["dim"] % x.ndim
    r.const("unflattened_size", _shape_layouts(r, out, [None] * dim + list(a["unflattened_size"]))[dim:])


def _permute_signature(self, *dims):
    pass


@register("permute", torch.permute)
def permute(r) -> None:
    a = r.bind(_permute_signature)
    dims = a["dims"]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    x, out = a["self"], r.out
    for i, d in enumerate(dims):
        r.same(out[i], x[d % x.ndim])


def _transpose_signature(self, dim0, dim1):
    pass


@register("transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", torch.swapdims)
def transpose(r) -> None:
    a = r.bind(_transpose_signature)
    x, out = a["self"], r.out
    d0, d1 = a["dim0"] % x.ndim, a["dim1"] % x.ndim
    order = list(range(x.ndim))
    order[d0], order[d1] = order[d1], order[d0]
    for i, d in enumerate(order):
        r.same(out[i], x[d])


@register("t", torch.t)
def matrix_transpose(r) -> None:
    x, out = r.input(0), r.out
    for i in range(x.ndim):
        r.same(out[i], x[x.ndim - 1 - i])


def _movedim_signature(input, source, destination):  # noqa: A002
    pass


@register("movedim", torch.movedim, "moveaxis", torch.moveaxis)
def movedim(r) -> None:
    a = r.bind(_movedim_signature)
    x, out = a["input"], r.out
    src = [a["source"]] if isinstance(a["source"], int) else list(a["source"])
    dst = [a["destination"]] if isinstance(a["destination"], int) else list(a["destination"])
    order = [None] * x.ndim
    for s, d in zip(src, dst):
        order[d % x.ndim] = s % x.ndim
    rest = iter(d for d in range(x.ndim) if d not in {s % x.ndim for s in src})
    order = [o if o is not None else next(rest) for o in order]
    for i, d in enumerate(order):
        r.same(out[i], x[d])


def _expand_signature(self, *sizes):
    pass


@register("expand", "broadcast_to", torch.broadcast_to)
def expand(r) -> None:
    """New or size-1 axes of an expand hold no data: they are broadcast atoms with a shape constant.

    ``torch.broadcast_to(k, q.shape)`` is the same op (Falcon's one key head per group of query heads).
    """
    a = r.bind(_expand_signature)
    x, out = a["self"], r.out
    sizes = a["sizes"]
    nested = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    sizes = sizes[0] if nested else sizes
    lead = out.ndim - x.ndim
    for d in range(out.ndim):
        if d >= lead and x.shape[d - lead] == out.shape[d]:
            r.same(x[d - lead], out[d])
        else:
            r.broadcast(out[d])
    if _follows_a_shape(r, sizes, out):
        return
    r.const("sizes", _shape_layouts(r, out, sizes), index=0 if nested else None)


def _expand_as_signature(self, other):
    pass


@register("expand_as")
def expand_as(r) -> None:
    a = r.bind(_expand_as_signature)
    x, other, out = a["self"], a["other"], r.out
    for d in range(out.ndim):
        r.same(other[d], out[d])
    lead = out.ndim - x.ndim
    for d in range(x.ndim):
        if x.shape[d] == out.shape[d + lead]:
            r.same(x[d], out[d + lead])


def _repeat_signature(self, *sizes):
    pass


@register("repeat")
def repeat(r) -> None:
    """``x.repeat(k)`` tiles: out index = copy * n + i, a product of a fresh copy atom and x's axis."""
    a = r.bind(_repeat_signature)
    x, out = a["self"], r.out
    sizes = a["sizes"]
    if isinstance(sizes, (tuple, list)) and len(sizes) == 1 and isinstance(sizes[0], fx.Node) and isinstance(
            sizes[0].meta.get("val"), (tuple, list, torch.Size)):
        r.freeze_all("repeat counts computed at run time")
        return
    nested = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    sizes = list(sizes[0] if nested else sizes)
    lead = out.ndim - x.ndim
    copies = []
    for d in range(out.ndim):
        copy = r.fresh(int(out.shape[d] // (x.shape[d - lead] if d >= lead else 1)), f"repeat copies {r.where}")
        copies.append(copy)
        r.product(out[d], [copy, x[d - lead]] if d >= lead else [copy])
    r.const("sizes", copies, index=0 if nested else None)


def _repeat_interleave_signature(input=None, repeats=None, dim=None, **kwargs):  # noqa: A002
    pass


@register(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(r) -> None:
    """``x.repeat_interleave(k, dim)`` copies each index k times: out index = i * k + copy, ``product(x, copies)``.

    Computed or per-index repeats (a tensor), and ``dim=None`` (flattened), freeze every axis.
    """
    a = r.bind(_repeat_interleave_signature)
    x, repeats, dim, out = a["input"], a["repeats"], a["dim"], r.out
    if not isinstance(x, TensorRef) or not isinstance(repeats, int) or not isinstance(dim, int) or out is None:
        r.freeze_all("repeat_interleave with tensor repeats or no dim")
        return
    dim %= x.ndim
    for d in range(x.ndim):
        if d != dim:
            r.same(x[d], out[d])
    copies = r.fresh(repeats, f"repeat_interleave copies {r.where}")
    r.product(out[dim], [x[dim], copies])
    r.const("repeats", copies)


def _new_factory_signature(self, *size, **kwargs):
    pass


@register("new_zeros", "new_ones", "new_empty")
def new_factory(r) -> None:
    a = r.bind(_new_factory_signature)
    size = a["size"]
    if _follows_a_shape(r, size, r.out):
        return
    nested = len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size))
    r.const("size", list(r.out.axes), index=0 if nested else None)


def _factory_signature(*size, **kwargs):
    pass


@register(torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn)
def factory(r) -> None:
    """``torch.zeros(B, C)``: fresh axes whose sizes are shape constants."""
    a = r.bind(_factory_signature)
    size = a["size"]
    if _follows_a_shape(r, size, r.out):
        return
    nested = len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size))
    r.const("size", list(r.out.axes), index=0 if nested else None)


def _full_signature(size, fill_value, **kwargs):
    pass


@register(torch.full)
def full(r) -> None:
    a = r.bind(_full_signature)
    if not _follows_a_shape(r, a["size"], r.out):
        r.const("size", list(r.out.axes))

