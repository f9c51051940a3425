"""Ops that join or cut an axis into segments: cat, stack, split, chunk, unbind, narrow, slicing.

Example: ``a, b = x.chunk(2, dim=1)`` states ``x[1] = concat(a[1], b[1])``, so
``a`` and ``b`` are separate groups; after pruning the chunk becomes a
``split`` with the new segment sizes, whatever they are.

Covered: cat, stack, split/chunk (rewritten to ``split`` with new sizes), unbind, narrow, getitem (tuples and basic
tensor indexing). One boolean mask among full slices (``x[mask]``, ``x[:, mask]``, ``x[..., mask]``):
``mask_select`` freezes the masked axes, the mask's and the picked-positions axis, and carries the others, so
``tokens (B, T, H)[keep (B, T)]`` leaves H prunable; it is also used by ``routing.index`` for ``aten.index``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxprune.algebra.context import TensorRef, tensor_value
from fxprune.rules import misc
from fxprune.rules.registry import register


def _cat_signature(tensors, dim=0, **kwargs):
    pass


@register(torch.cat, torch.concat, torch.concatenate)
def cat(r) -> None:
    a = r.bind(_cat_signature)
    parts = [r.tensor(t) for t in a["tensors"]]
    out = r.out
    dim = a["dim"] % out.ndim
    parts = [p for p in parts if p is not None and p.ndim == out.ndim]
    for p in parts:
        for d in range(out.ndim):
            if d != dim:
                r.same(p[d], out[d])
    r.concat(out[dim], [p[dim] for p in parts])


@register(torch.stack)
def stack(r) -> None:
    a = r.bind(_cat_signature)
    out = r.out
    dim = a["dim"] % out.ndim
    for t in a["tensors"]:
        p = r.tensor(t)
        for d in range(p.ndim):
            r.same(p[d], out[d if d < dim else d + 1])
    r.freeze(out[dim], "stacked tensors")


def _segments(r, x: TensorRef, dim: int) -> list[TensorRef]:
    outs = []
    for i in range(len(r.node.meta["val"])):
        piece = r.output(i)
        outs.append(piece)
        for d in range(x.ndim):
            if d != dim:
                r.same(piece[d], x[d])
    r.concat(x[dim], [p[dim] for p in outs])
    return outs


def _split_hook(segments: list, dim: int):
    """Pass the new segment sizes as a list: ``split`` accepts any sizes, ``chunk`` does not."""

    def hook(node: fx.Node, sizes) -> None:
        old = [int(v.shape[dim]) for v in node.meta["val"]]
        new = [sizes.new(layout) for layout in segments]
        if new != old:
            node.target = "split" if node.op == "call_method" else torch.split
            node.args, node.kwargs = (node.args[0], new), {"dim": dim}

    return hook


@register(torch.split, "split", torch.chunk, "chunk", "split_with_sizes")
def split(r) -> None:
    """split and chunk: the input axis is the concatenation of the output segments."""
    args = list(r.node.args) + [r.node.kwargs[k] for k in ("split_size_or_sections", "split_size", "chunks",
                                                           "split_sizes", "sections") if k in r.node.kwargs]
    dim = r.node.kwargs.get("dim", args[2] if len(args) > 2 else 0)
    x = r.input(0)
    dim %= x.ndim
    outs = _segments(r, x, dim)
    r.on_rewrite(_split_hook([o[dim] for o in outs], dim))


def _unbind_signature(input, dim=0):  # noqa: A002
    pass


@register(torch.unbind, "unbind")
def unbind(r) -> None:
    a = r.bind(_unbind_signature)
    x = a["input"]
    dim = a["dim"] % x.ndim
    r.freeze(x[dim], "unbind index")
    for i in range(len(r.node.meta["val"])):
        piece = r.output(i)
        for d in range(x.ndim):
            if d != dim:
                r.same(piece[d if d < dim else d - 1], x[d])


def _narrow_signature(input, dim, start, length):  # noqa: A002
    pass


@register(torch.narrow, "narrow")
def narrow(r) -> None:
    a = r.bind(_narrow_signature)
    x, out = a["input"], r.out
    dim = a["dim"] % x.ndim
    if not isinstance(a["start"], int):
        r.freeze_all("narrow with a computed start")
        return
    for d in range(x.ndim):
        if d != dim:
            r.same(x[d], out[d])
    start, length = a["start"] % x.shape[dim], out.shape[dim]
    pre, post = r.fresh(start), r.fresh(x.shape[dim] - start - length)
    r.concat(x[dim], [pre, out[dim], post])
    r.const("start", pre)
    r.const("length", out[dim])


@register(operator.getitem)
def getitem(r) -> None:
    source, index = r.node.args
    if isinstance(source, fx.Node) and isinstance(source.meta.get("val"), (tuple, list)):
        _tuple_item(r, source, index)
    elif tensor_value(source) is not None:
        _tensor_index(r, r.tensor(source), index)


def _tuple_item(r, source: fx.Node, index) -> None:
    """``out = t[i]`` or ``t[a:b]`` of a tuple-valued node: the output's tensors are those elements'.

    Example: ``y, state = lstm(x); c = state[-1]`` ties ``c`` to element 1 of ``state`` (a negative
    index counts from the end, as in Python), and ``rest = parts[1:]`` ties ``rest[0]`` to ``parts[1]``.
    """
    count = len(source.meta["val"])
    if isinstance(index, int) and -count <= index < count:
        def element_path(path: tuple) -> tuple:
            return (index % count,) + path
    elif isinstance(index, slice):
        chosen = range(count)[index]

        def element_path(path: tuple) -> tuple:
            return (chosen[path[0]],) + path[1:]
    else:
        r.freeze_all("tuple index")
        return
    base = ("v", source.name, ()) if source.op != "get_attr" else None
    for out in r.tensors_out():
        if base is None:
            r.freeze(out, "tuple attribute")
            continue
        element = TensorRef(r.state, ("v", source.name, element_path(out.key[2])), out.shape)
        for d in range(out.ndim):
            r.same(element[d], out[d])


def _tensor_index(r, x: TensorRef, index) -> None:
    """Basic indexing: slices with step 1 cut segments, an int picks a unit of its own
    (:func:`~fxprune.rules.misc.integer_index`), None adds an axis."""
    out = r.out
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(not isinstance(e, (int, slice, type(None), type(Ellipsis))) for e in entries):
        if not (_gather_index(r, x, out, entries) or _mask_entry(r, x, out, entries)):
            r.freeze_all("advanced indexing")
        return
    # each entry's place in the written index (None: a full slice that the ellipsis or the end stands for), so that
    # rewriting changes the entry the code wrote
    positions = list(range(len(entries)))
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        fill = x.ndim - sum(isinstance(e, (int, slice)) for e in entries)
        entries = entries[:at] + [slice(None)] * fill + entries[at + 1:]
        positions = positions[:at] + [None] * fill + positions[at + 1:]
    fill = x.ndim - sum(isinstance(e, (int, slice)) for e in entries)
    entries, positions = entries + [slice(None)] * fill, positions + [None] * fill
    din = dout = 0
    for position, e in zip(positions, entries):
        if e is None:
            dout += 1
        elif isinstance(e, int):
            misc.integer_index(r, x[din], *_index_entry(position, isinstance(index, tuple)))
            din += 1
        else:
            _slice(r, x, din, out, dout, e, position, isinstance(index, tuple))
            din += 1
            dout += 1


def _index_entry(position: int, in_tuple: bool):
    """(read, write) of entry ``position`` of a ``getitem`` node's index (the whole index when not a tuple)."""
    def read(node):
        return node.args[1][position] if in_tuple else node.args[1]

    def write(node, value) -> None:
        index = node.args[1]
        node.args = (node.args[0], index[:position] + (value,) + index[position + 1:] if in_tuple else value)

    return read, write


def _gather_index(r, x: TensorRef, out: TensorRef, entries: list) -> bool:
    """``table[idx]`` or ``x[:, idx]``: one integer tensor index among full slices.

    Example (MaxViT's relative position bias): ``table (169, H)[idx (2401,)]`` is
    ``(2401, H)``; the indexed axis is frozen (its positions are data), the index's
    axes become the output's axes at that position, and ``H`` carries over, so the
    heads stay prunable. Returns False for any other advanced index.
    """
    ellipsis = Ellipsis in entries
    if ellipsis:
        at = entries.index(Ellipsis)
        entries = entries[:at] + [slice(None)] * (x.ndim - len(entries) + 1) + entries[at + 1:]
    tensors = [i for i, e in enumerate(entries) if isinstance(e, fx.Node)]
    if len(tensors) != 1 or len(entries) > x.ndim:
        return False
    p = tensors[0]
    value = tensor_value(entries[p])
    if value is None or value.dtype == torch.bool or any(e != slice(None) for e in entries if e is not entries[p]):
        return False
    if out.ndim != x.ndim - 1 + value.ndim:
        return False
    idx = r.tensor(entries[p])
    r.freeze(x[p], "indexed by data")
    for d in range(p):
        r.same(x[d], out[d])
    for j in range(idx.ndim):
        r.same(idx[j], out[p + j])
    for d in range(p + 1, x.ndim):
        r.same(x[d], out[d - 1 + idx.ndim])
    return True


def _mask_entry(r, x: TensorRef, out: TensorRef, entries: list) -> bool:
    """``x[mask]``, ``x[:, mask]``, ``x[..., mask]``: one boolean tensor among full slices (see :func:`mask_select`)."""
    tensors = [i for i, e in enumerate(entries) if isinstance(e, fx.Node)]
    if len(tensors) != 1 or out is None:
        return False
    p = tensors[0]
    value = tensor_value(entries[p])
    if value is None or value.dtype not in (torch.bool, torch.uint8):
        return False
    if Ellipsis in entries:  # the ellipsis stands for the axes the other entries and the mask leave
        at = entries.index(Ellipsis)
        fill = x.ndim - (len(entries) - 2) - value.ndim
        if fill < 0:
            return False
        entries = entries[:at] + [slice(None)] * fill + entries[at + 1:]
        p = next(i for i, e in enumerate(entries) if isinstance(e, fx.Node))
    if any(e != slice(None) for i, e in enumerate(entries) if i != p):
        return False
    return mask_select(r, x, out, p, r.tensor(entries[p]))


def mask_select(r, x: TensorRef, out: TensorRef, at: int, mask: TensorRef) -> bool:
    """``x[..., mask]``: a boolean ``mask`` over axes ``at .. at + k - 1`` of ``x`` picks positions.

    The masked axes become one output axis whose length is data (how many positions the mask keeps): they
    freeze, with the mask's own axes and that output axis; every other axis carries over. Example:
    ``pooled (B, C)[keep (B,)]`` is ``(N, C)``: N is data, C stays prunable (a kept row keeps its channels);
    ``tokens (B, T, H)[padding_mask (B, T)]`` is ``(N, H)``: H stays prunable. Returns False (the caller
    freezes) when the mask does not match those axes (a broadcast mask) or the output has another rank.
    """
    k = mask.ndim
    if k == 0 or at + k > x.ndim or out.ndim != x.ndim - k + 1 or mask.shape != x.shape[at:at + k]:
        return False
    for j in range(k):
        r.freeze(x[at + j], "indexed by a mask")
        r.freeze(mask[j], "indexed by a mask")
    r.freeze(out[at], "positions a mask picked")
    for d in range(at):
        r.same(x[d], out[d])
    for d in range(at + k, x.ndim):
        r.same(x[d], out[d - k + 1])
    return True


def _slice(r, x, din: int, out, dout: int, s: slice, position: int, in_tuple: bool) -> None:
    size = x.shape[din]
    if not all(isinstance(v, (int, type(None))) for v in (s.start, s.stop, s.step)):
        r.freeze(x[din], "slice with computed bounds")
        r.freeze(out[dout], "slice with computed bounds")
        return
    start, stop, step = s.indices(size)
    if step != 1:
        r.freeze(x[din], "strided slice")
        r.freeze(out[dout], "strided slice")
        return
    if out.shape[dout] == size:
        r.same(x[din], out[dout])
        return
    stop = max(stop, start)
    pre, post = r.fresh(start), r.fresh(size - stop)
    r.concat(x[din], [pre, out[dout], post])
    r.on_rewrite(_slice_hook(position, in_tuple, pre, out[dout], post))


def _slice_hook(position: int, in_tuple: bool, pre, mid, post):
    """New bounds from the new segment sizes; a bound counted from the end stays counted from the end.

    Example: ``y[:, -2:]`` on a sequence axis of 5 (frozen, so nothing changes) stays ``-2:`` and still
    takes the last 2 rows of a longer input; ``y[:, 1:4]`` whose 3 units lose 1 becomes ``1:3``.
    """

    def hook(node: fx.Node, sizes) -> None:
        if all(sizes.new(layout) == sizes.old(layout) for layout in (pre, mid, post)):
            return  # keep the slice exactly as written: its bounds may be relative to a dynamic size
        old = node.args[1][position] if in_tuple else node.args[1]
        n_pre, n_mid, n_post = sizes.new(pre), sizes.new(mid), sizes.new(post)
        if old.start is None:
            start = None
        elif old.start < 0 and n_mid + n_post:
            start = -(n_mid + n_post)
        else:
            start = n_pre
        if old.stop is None:
            stop = None
        elif old.stop < 0:
            stop = -n_post if n_post else None
        else:
            stop = n_pre + n_mid
        new = slice(start, stop, old.step)
        if in_tuple:
            entries = list(node.args[1])
            entries[position] = new
            node.args = (node.args[0], tuple(entries))
        else:
            node.args = (node.args[0], new)

    return hook
