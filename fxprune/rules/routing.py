"""Data-dependent routing, as mixture-of-experts blocks dispatch tokens: top-k, gathers, scatters, grouped matmul.

A router picks experts per token (``topk``), tokens are gathered per expert (``x[idx]``, ``index_select``),
each expert runs on its rows (a loop over ``W[e]`` of a 3-d expert weight, ``W[expert_ids]`` then ``bmm``, or
one grouped matmul over offsets from ``histc`` + ``cumsum``) and the rows are added back per token
(``index_add``, ``index_put``, ``scatter_add``). Positions chosen by data freeze (the token axis); the
feature axes the data only moves carry over, so hidden and expert-MLP widths stay prunable. The router's expert
ids are followed as values: where they are read only as positions along an axis (``W[ids]``, histogram bins),
that axis is the router's experts axis, so whole experts are one group (router rows and every expert tensor),
which keeps at least top-k units. Example (Mixtral through ``torch.export``, transformers 5)::

    idx = topk(softmax(x @ gate.T), 2)[1]          # (T, 2): k frozen, T carries over, E ranked
    h = x[perm // 2]                               # aten.index: (T*2, H), H carries over
    offs = cumsum(histc(sort(idx.reshape(-1))[0], bins=E, max=E-1))   # (E,): the router's experts
    y = grouped_mm(h, gate_up_proj.transpose(1, 2), offs)   # (T*2, 2I): H = W[1], 2I = W[2], E = W[0]

The rules: ``topk`` (k axis frozen, others carried; the ranked axis stays prunable, keeping k units
(``r.keep_at_least``), only when the indices, followed through reshapes, casts and sort's values, are read nowhere
but as positions that the rules below tie to it: a router's expert ids); ``histc`` of expert ids with ``bins = max +
1`` (bins = the router's experts; ``bins``/``max`` rewritten); ``cumsum`` of such a histogram (grouped matmul's
offsets: carried, not scanned); ``aten.index`` (indexed axes frozen, the others carried: ``x[perm]`` keeps the
hidden axis, ``W[expert_ids]`` of a 3-d expert weight keeps its unit axes, ties its expert axis to the router's, and
is no activation, so its ``bmm`` is a linear layer, not attention); ``index_select``;
``index_put``/``index_add``/``scatter_add`` (data axis frozen); grouped matmul (``aten._grouped_mm``, transformers'
``grouped_mm_fallback``: ``(S, K) x (E, K, N)``, K and N one unit axis for every expert, E the offsets' axis).
"""

from __future__ import annotations

import operator

import torch

from fxprune.algebra.context import TensorRef
from fxprune.rules import constants
from fxprune.rules.segments import mask_select
from fxprune.rules.registry import aten_overloads, register

aten = torch.ops.aten


def _topk_signature(input, k, dim=-1, *args, **kwargs):  # noqa: A002
    pass


# ops whose output holds the same integer values as their first argument (expert ids reshaped, sorted, cast)
_SAME_VALUES = {"view", "reshape", "_unsafe_view", "flatten", "to", "_to_copy", "clone", "contiguous", "detach",
                "alias", "lift_fresh_copy"}


def _opname(node) -> str:
    if getattr(node, "op", None) != "call_function":
        return ""
    return getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")


def _ids_origin(node):
    """The ``topk`` node whose indices ``node`` holds (through reshapes, casts and sort's values), else None.

    Example: ``histc(sort(topk(p, 2)[1].reshape(-1))[0].float(), bins=E)`` reaches ``topk``: the histogram's
    bins are the ranked axis of ``p``."""
    while node is not None and getattr(node, "op", None) == "call_function":
        if node.target is operator.getitem:
            source, item = node.args
            name = _opname(source)
            if name == "topk" and item == 1:
                return source
            if name == "sort" and item == 0:  # sorted values are the same ids
                node = source.args[0]
                continue
            return None
        if _opname(node) not in _SAME_VALUES:
            return None
        node = node.args[0]
    return None


def ranked_axis(r, node):
    """The layout whose positions the integer values of ``node`` are (the axis ``topk`` ranked), else None."""
    origin = _ids_origin(node) if hasattr(node, "op") else None
    if origin is None:
        return None
    x = r.tensor(origin.args[0])
    dim = origin.args[2] if len(origin.args) > 2 else origin.kwargs.get("dim", -1)
    return x[dim] if x is not None and x.ndim else None


def _ids_reach_only_tying_ops(indices) -> bool:
    """Every use of top-k's indices ends in an op that ties their values to an axis (histogram bins, the index
    of a tensor), through reshapes, casts and sort's values; sort's own positions are no ids."""
    todo = [(user, indices) for user in indices.users]
    while todo:
        user, via = todo.pop()
        name = _opname(user)
        if user.op != "call_function":
            return False
        if user.target is operator.getitem and _opname(user.args[0]) == "sort":
            if user.args[1] == 0:
                todo.extend((u, user) for u in user.users)
            continue
        if name == "sort" or (name in _SAME_VALUES and user.args[0] is via):
            todo.extend((u, user) for u in user.users)
        elif name == "histc" and user.args[0] is via:
            continue
        elif name == "index" and user.args[0] is not via:  # W[ids]: the ids index W, they are not W
            continue
        elif name in ("_assert_tensor_metadata", "sym_size", "size"):  # reads metadata, not the ids
            continue
        else:
            return False
    return True


@register(*aten_overloads("topk"), torch.topk, "topk")
def topk(r) -> None:
    """``values, indices = x.topk(k, dim)``: the k axis is data (frozen), the others carry over.

    The ranked axis stays prunable (at least k of its units kept) when the indices are only read as positions
    along axes that the rules tie to it (a router's expert ids: histogram bins, ``W[ids]`` of a 3-d expert
    weight, one-hot classes): removing unit e removes it there too, and the ids of the rest are recomputed in the
    smaller space. Any other use of the indices (arithmetic, an output) freezes it. Example: router
    probabilities (T, E) give (T, k): T carries over, k freezes, E is the experts' axis.
    """
    a = r.bind(_topk_signature)
    x, dim = a["input"], a["dim"]
    dim = dim % x.ndim if x.ndim else 0
    indices = next((u for u in r.node.users if u.args[1:] == (1,) and _opname(u) == "getitem"), None)
    if x.ndim and (indices is None or not isinstance(a["k"], int) or not _ids_reach_only_tying_ops(indices)):
        r.freeze(x[dim], "top-k ranked axis")
    elif x.ndim:
        r.keep_at_least(x[dim], a["k"])
    for out in r.tensors_out():
        for d in range(out.ndim):
            if d == dim:
                r.freeze(out[d], "top-k ranked axis")
            else:
                r.same(x[d], out[d])


def _index_signature(input, indices):  # noqa: A002
    pass


@register(*aten_overloads("index"))
def index(r) -> None:
    """``aten.index(x, [None, idx, ...])`` (``x[:, idx]``): indexed axes freeze, the others carry over.

    Integer index tensors broadcast to one shape B; when they sit at adjacent positions B replaces them
    there, otherwise B comes first (numpy's rule). Example: ``x (T, H)[perm (S,)]`` is ``(S, H)`` with H
    carried over; ``W (E, 2I, H)[ids (S,)]`` is ``(S, 2I, H)``: an expert weight picked per token keeps
    its unit axes. One constant index (``qkv[..., [-2], :]``) picks units of their own and the rest of its
    axis stays prunable (:func:`fxprune.rules.constants.constant_positions`). One boolean mask among full
    slices (``x[:, mask]``, of data-dependent length) freezes the axes it masks and carries the others
    (:func:`fxprune.rules.segments.mask_select`); any other use of a mask freezes every axis.
    """
    a = r.bind(_index_signature)
    x, indices, out = a["input"], list(a["indices"]), r.out
    if not r.reads_input(x):
        # weights picked per token (``W[expert_ids]``) are weights, not activations: a product with them
        # (batched_mm's ``bmm(W[ids], x)``) is a linear layer, not attention whose widths are head dims
        r.state.from_input.discard(r.node.name)
    refs = [r.tensor(i) if i is not None else None for i in indices]
    values = [r.node.args[1][p] for p in range(len(indices))]
    masks = [p for p, v in enumerate(values) if v is not None and _dtype(v) in (torch.bool, torch.uint8)]
    if out is None or masks:
        lone = len(masks) == 1 and all(v is None for p, v in enumerate(values) if p != masks[0])
        if not (lone and refs[masks[0]] is not None and mask_select(r, x, out, masks[0], refs[masks[0]])):
            r.freeze_all("indexing by a mask")
        return
    used = [p for p, t in enumerate(refs) if t is not None]
    if not used or any(values[p] is not None and refs[p] is None for p in range(len(values))):
        r.freeze_all("indexing by a tensor")
        return
    b = out.ndim - (x.ndim - len(used))  # the broadcast index rank
    adjacent = used == list(range(used[0], used[-1] + 1))
    at = used[0] if adjacent else 0
    for p in used:
        space = ranked_axis(r, values[p])
        if space is not None:  # W[expert_ids]: the expert axis of W is the router's
            r.same(x[p], space)
        elif len(used) > 1 or not constants.constant_positions(r, x, p, values[p], p):
            r.freeze(x[p], "indexed by data")
    for j in range(b):
        r.freeze(out[at + j], "index positions")
    rest = [d for d in range(x.ndim) if d not in used]
    out_rest = [d for d in range(out.ndim) if not at <= d < at + b]
    for d, e in zip(rest, out_rest):
        r.same(x[d], out[e])


def _dtype(value):
    val = value.meta.get("val") if hasattr(value, "meta") else None
    return getattr(val, "dtype", None)


def _index_select_signature(input, dim, index):  # noqa: A002
    pass


@register(*aten_overloads("index_select"), torch.index_select, "index_select")
def index_select(r) -> None:
    """``x.index_select(dim, idx)``: ``dim`` is data (frozen on both sides), every other axis carries over."""
    a = r.bind(_index_select_signature)
    x, out = a["input"], r.out
    dim = a["dim"] % x.ndim
    for d in range(x.ndim):
        if d == dim:
            r.freeze(x[d], "indexed by data")
            r.freeze(out[d], "indexed by data")
        else:
            r.same(x[d], out[d])


def _index_put_signature(input, indices, values, accumulate=False):  # noqa: A002
    pass


@register(*aten_overloads("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"))
def index_put(r) -> None:
    """``x[idx] = v`` (or ``+=`` with ``accumulate``): the result has ``x``'s axes; the indexed axes freeze,
    and ``v`` broadcasts against ``x[idx]`` from the right: its axes facing ``x``'s unindexed axes are those axes,
    the ones facing the index positions freeze (with the ``x`` axis they face, if the sizes disagree).

    Example: ``out (T, H).index_put_([tok], rows (S, H), accumulate=True)``: T frozen, H ties out, x and rows;
    ``y (C, T)[:, idx] = v (C, S)`` ties C.
    """
    a = r.bind(_index_put_signature)
    x, v, out = a["input"], a["values"], r.out
    indices = list(a["indices"])
    for d in range(x.ndim):
        r.same(x[d], out[d])
    used = [p for p, i in enumerate(indices) if i is not None]
    if any(_dtype(i) in (torch.bool, torch.uint8) for i in indices if i is not None) or not used:
        r.freeze_all("index_put by a mask")
        return
    for p in used:
        r.freeze(x[p], "indexed by data")
    if not isinstance(v, TensorRef):
        return
    rest = [d for d in range(x.ndim) if d not in used]
    adjacent = used == list(range(used[0], used[-1] + 1))
    b = max((_ndim(i) for i in indices if i is not None), default=0)
    # the axes of x[idx] that v broadcasts against: x's axes, None for the index positions
    if adjacent:
        target = [d for d in rest if d < used[0]] + [None] * b + [d for d in rest if d > used[-1]]
    else:
        target = [None] * b + rest
    for j in range(1, v.ndim + 1):  # v aligns from the right with x[idx]
        d = target[-j] if j <= len(target) else None
        if d is not None and v.shape[-j] == x.shape[d]:
            r.same(v[-j], x[d])
        elif v.shape[-j] == 1:
            r.broadcast(v[-j])
        else:
            r.freeze(v[-j], "index_put values")
            if d is not None:
                r.freeze(x[d], "index_put values")


def _ndim(index) -> int:
    val = index.meta.get("val") if hasattr(index, "meta") else None
    return getattr(val, "ndim", 0)


def _index_add_signature(input, dim, index, source, *args, **kwargs):  # noqa: A002
    pass


@register(*aten_overloads("index_add", "index_add_", "index_copy", "index_copy_"), "index_add", "index_add_")
def index_add(r) -> None:
    """``x.index_add_(dim, idx, src)``: rows of ``src`` added into ``x`` at data positions along ``dim``
    (frozen in ``x``, ``src`` and the result); the other axes of all three are one.

    Example: the per-expert loop's ``final.index_add_(0, token_idx, expert_out)``: tokens frozen, H carried.
    """
    a = r.bind(_index_add_signature)
    x, src, out = a["input"], a["source"], r.out
    dim = a["dim"] % x.ndim
    for d in range(x.ndim):
        if out is not None:
            r.same(x[d], out[d])
        if d == dim:
            r.freeze(x[d], "indexed by data")
            if isinstance(src, TensorRef) and d < src.ndim:
                r.freeze(src[d], "indexed by data")
        elif isinstance(src, TensorRef) and src.ndim == x.ndim:
            r.same(src[d], x[d])
        elif isinstance(src, TensorRef):
            r.freeze_all("index_add of another rank")
            return


def _scatter_signature(input, dim, index, src=None, *args, **kwargs):  # noqa: A002
    pass


@register(*aten_overloads("scatter_add", "scatter_add_", "scatter", "scatter_", "scatter_reduce", "scatter_reduce_"))
def scatter(r) -> None:
    """``x.scatter_add(dim, idx, src)``: ``dim`` is data; an axis where ``idx`` and ``src`` are as long as ``x``
    is one axis of all four (each position of it is written from the same position); a shorter one freezes."""
    a = r.bind(_scatter_signature)
    x, idx, src, out = a["input"], a["index"], a["src"], r.out
    dim = a["dim"] % x.ndim
    parts = [t for t in (idx, src) if isinstance(t, TensorRef)]
    for d in range(x.ndim):
        if out is not None:
            r.same(x[d], out[d])
        if d == dim or any(t.ndim != x.ndim or t.shape[d] != x.shape[d] for t in parts):
            r.freeze(x[d], "scattered by data")
            for t in parts:
                if d < t.ndim:
                    r.freeze(t[d], "scattered by data")
        else:
            for t in parts:
                r.same(t[d], x[d])


def _histc_signature(input, bins=100, min=0, max=0):  # noqa: A002
    pass


@register(*aten_overloads("histc"))
def histogram(r) -> None:
    """``histc(ids, bins=E, min=0, max=E-1)``: tokens per expert. The positions counted are data (frozen); when
    ``ids`` are a router's top-k indices, the bins are its experts' axis (``bins`` and ``max`` follow it)."""
    a = r.bind(_histc_signature)
    x, out = a["input"], r.out
    space = ranked_axis(r, r.node.args[0])
    for d in range(x.ndim):
        r.freeze(x[d], "histogram of data")
    bins, low, high = a["bins"], a["min"], a["max"]
    if space is None or not (low == 0 and high == bins - 1):
        r.freeze(out, "histogram of data")
        if space is not None:  # bins over another range than the router's ids: its experts stay
            r.freeze(space, "histogram of expert ids over another range")
        return
    r.same(out[0], space)
    r.const("bins", space)
    r.on_rewrite(_histc_max(space))


def _histc_max(space):
    def hook(node, sizes) -> None:
        new = sizes.new(space) - 1
        if len(node.args) > 3:
            node.args = node.args[:3] + (new,) + node.args[4:]
        else:
            node.kwargs = {**node.kwargs, "max": new}

    return hook


@register(*aten_overloads("bincount"))
def bincount(r) -> None:
    """``bincount(ids)``: its length is the largest id + 1, data: every axis freezes."""
    r.freeze_all("histogram of data")


def _cumsum_signature(input, dim, *args, **kwargs):  # noqa: A002
    pass


@register(*aten_overloads("cumsum"))
def cumsum(r) -> None:
    """Cumulative sums mix positions along ``dim`` (frozen), except offsets summed over a histogram of expert
    ids (grouped matmul's ``offs``): the counts are recomputed from the pruned router, so the experts' axis
    carries over. Other axes carry over."""
    from fxprune.rules.aten import scan

    a = r.bind(_cumsum_signature)
    x, out = a["input"], r.out
    source = r.node.args[0]
    while _opname(source) in _SAME_VALUES:
        source = source.args[0]
    if _opname(source) == "histc" and x.ndim == 1 and ranked_axis(r, source.args[0]) is not None:
        r.same(x[0], out[0])
    else:
        scan(r)


def grouped_mm(r) -> None:
    """``grouped_mm(x (S, K), W (E, K, N), offs (E,))`` is ``(S, N)``: rows ``offs[e-1]:offs[e]`` times ``W[e]``.

    K and N are unit axes of every expert at once (a 3-d weight stays rectangular: unit ``j`` of N is unit
    ``j`` of each expert); S carries over; E ties the offsets. ``W (E, M, K) @ (E, K, N)`` is a batched
    product. Other layouts (offsets over K) freeze.
    """
    # positional: aten._grouped_mm names its operands (self, mat2, offs), transformers' fallback (input, weight, offs)
    x, w, out = r.input(0), r.input(1), r.out
    offs = r.input(2) if len(r.node.args) > 2 else r.tensor(r.node.kwargs.get("offs"))
    if x.ndim == 2 and w.ndim == 3 and out.ndim == 2:
        r.same(x[0], out[0])
        r.same(x[1], w[1])
        r.same(w[2], out[1])
        if isinstance(offs, TensorRef):
            r.same(offs[0], w[0])
    elif x.ndim == 3 and w.ndim == 3 and out.ndim == 3:
        r.same(x[0], w[0])
        r.same(x[0], out[0])
        r.same(x[1], out[1])
        r.same(x[2], w[1])
        r.same(w[2], out[2])
    else:
        r.freeze_all("grouped matmul over offsets along the contraction")


# transformers' custom op (``torch.ops.transformers.grouped_mm_fallback``), named so that it needs no import
register(*aten_overloads("_grouped_mm"), "torch._ops.transformers:transformers::grouped_mm_fallback")(grouped_mm)
