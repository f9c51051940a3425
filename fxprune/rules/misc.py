"""Lookups and metadata: embedding, ``size()``/``shape``/``dim()``, attribute access on tensors.

Example: ``F.embedding(ids (B, S), w (V, D))`` ties ``out[2]`` to ``w[1]``; the
vocabulary axis ``w[0]`` is indexed by data, so it is frozen.

``values_read`` (``item``, ``tolist``, ``nonzero``, ``argwhere``, ``unique``, ``unique_consecutive``,
``masked_select``, and their aten overloads): every axis frozen with the reason "values read as data".
``integer_index`` (``x.select(d, i)``, ``x[:, i]``): the axis is split into before ++ picked(1) ++ after, the picked
unit frozen and the index moved to where it lands (see ``fxprune.analysis.relate``).
"""

from __future__ import annotations

import builtins

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import family, register
from fxprune.rules.shape import matrix_transpose


def _embedding_signature(input, weight, padding_idx=None, *args, **kwargs):  # noqa: A002
    pass


@register(nn.Embedding, F.embedding)
def embedding(r) -> None:
    a = r.bind(_embedding_signature)
    ids, w, out = a["input"], a["weight"], r.out
    for d in range(ids.ndim):
        r.same(ids[d], out[d])
    r.same(w[1], out[-1])
    r.freeze(w[0], "vocabulary (indexed by data)")
    r.module_attr("embedding_dim", w[1])


def metadata(r) -> None:
    """Reading a tensor's size, dtype or device states no relation (its value follows the tensor)."""


family(metadata, "size", "dim", "numel", "get_device", "element_size", "is_contiguous",
       builtins.len, torch.numel, torch.is_tensor, builtins.isinstance,
       "fxprune.analysis.dynamic:expect_size")  # the check at a graph's entry of an input's size

def values_read(r) -> None:
    """An op whose result is values or positions read from its input (``.item()``, ``.tolist()``, ``nonzero``,
    ``unique``, ``masked_select``): every axis on both sides is data, so it freezes, with that reason.

    Example: ``boxes[(scores > 0.5).nonzero()[:, 0]]``: the score axis freezes; whatever carries the kept
    positions (``index_select``, a gather) relates the other axes. Propagation runs these ops for real
    on the example inputs (:mod:`fxprune.analysis.propagate`): their output sizes are data.
    """
    r.freeze_all(f"values read as data ({r.node.target if isinstance(r.node.target, str) else r.node.target.__name__})")


family(values_read, "item", "tolist", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select",
       torch.nonzero, torch.argwhere, torch.unique, torch.unique_consecutive, torch.masked_select)

_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout")


def values_unused(node) -> bool:
    """Whether no op reads the values of ``node``'s result: every user only reads its size, dtype or device
    (``sym_size``, ``.shape``), or there is no user at all (dead code, which rewriting drops).

    Example: BART's ``embed_positions(inputs_embeds[:, :, -1])  # needed for the shape only``: the selected
    column is only measured, so the hidden axis it is selected from need not keep its units.
    """
    from fxprune.rules.registry import lookup

    def metadata_only(user) -> bool:
        if user.op == "call_function" and user.target is builtins.getattr:
            return user.args[1] in _METADATA_ATTRIBUTES
        return user.op in ("call_function", "call_method") and lookup(user) is metadata

    return all(metadata_only(user) for user in node.users)


def integer_index(r, axis, read, write) -> None:
    """An integer index into ``axis`` (``x.select(d, i)``, ``x[:, i]``): the picked position becomes a unit of its
    own (a frozen size-1 segment of the axis) and the rest of the axis stays prunable; rewriting moves the index
    to where that unit lands (one counted from the end stays counted from the end), as a constant list index
    does (:func:`fxprune.rules.constants.constant_positions`). ``read(node)`` / ``write(node, i)``: the index
    argument. Where only the result's shape is read (:func:`values_unused`), nothing is picked: the whole axis
    stays prunable and the index is clamped into the pruned axis so that it stays valid. An index that is no
    literal int freezes the axis.

    Example: Falcon's ``grouped[..., -2, :]`` (its one key head after the query heads of a kv group,
    ``aten.select.int``) splits ``Cat(queries(4), kv(2))`` into ``Cat(queries(4), k(1), v(1))``: the query
    heads stay prunable and ``-2`` still picks the key head. ``inputs_embeds[:, :, -1]`` taken for its shape
    leaves the whole hidden size prunable.
    """
    index = read(r.node)
    size = axis.size(r.state.solver)
    if not isinstance(index, int) or not -size <= index < size:
        r.freeze(axis, "integer index")
        return
    if values_unused(r.node):
        def clamp(node, sizes) -> None:
            old, new = read(node), sizes.new(axis)
            if old >= new or old < -new:
                write(node, new - 1 if old >= 0 else -new)

        r.on_rewrite(clamp)
        return
    position = index % size
    before, picked, after = (r.fresh(n, f"segments around an integer index {r.where}")
                             for n in (position, 1, size - position - 1))
    r.concat(axis, [before, picked, after])
    r.freeze(picked, "integer index")

    def move(node, sizes) -> None:
        moved = sizes.new(before) if index >= 0 else -1 - sizes.new(after)
        if moved != read(node):
            write(node, moved)

    r.on_rewrite(move)


@register(builtins.getattr)
def tensor_attribute(r) -> None:
    name = r.node.args[1]
    if name in _METADATA_ATTRIBUTES:
        return
    if name in ("T", "mT") and r.input(0) is not None and r.input(0).ndim == 2:
        matrix_transpose(r)
        return
    r.freeze_all(f"tensor attribute .{name}")
