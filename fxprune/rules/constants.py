"""Tensors the forward computes from constants: ``torch.arange`` with constant bounds, constant index tensors.

A parameter is pruned by slicing it at its source: every op after it relates its axes (or freezes them), so
the pruned graph computes the original values at the kept indices. A tensor the forward *computes* from
constants is no different: ``arange(1, 1 + H)`` with literal bounds holds known values, so rewriting keeps the
values of its kept indices, stored as a constant buffer that replaces the call. BLOOM's ALiBi slopes,
``pow(base, arange(1, 1 + H))``, keep each kept head's own slope (rewriting the bounds instead,
``arange(1, H')``, would hand the kept heads the slopes of other heads). An ``arange`` over a size read at
run time (positions up to the sequence length) has no known values: it stays frozen.

Where an axis reads a constant *position* (``qkv[..., [-2], :]``: Falcon's one key head after the query
heads), the position is a unit of its own (a segment of size 1, never pruned) and the index is rewritten to
where that unit lands; the rest of the axis stays prunable.

Example (ALiBi slopes through ``torch.export``)::

    slopes = pow(full((), 0.25), arange(1, 5))          # (4,): one slope per head, sliced at rewrite
    alibi = slopes[:, None, None] * positions           # heads carry over to the attention scores
    k = qkv[:, :, [-2]]                                 # qkv's axis = Cat(heads(4), k(1), v(1)): heads prunable

In place (``prune(..., inplace=True)``) the model runs its own forward code again, which recomputes such a
tensor from its attributes and config: the sliced values cannot be stored, so in-place pruning freezes these
axes (:func:`fxprune.rewriting.inplace.freezes.freeze_computed_constants`).

The kept values become a non-persistent ``_fxprune_*`` buffer; ``r.sliced_constant(axis)`` records such axes in
``state.sliced_constants`` (read by ``fxprune.analysis.untie``). A hook moves a constant index to where the picked
units land; a negative index stays negative.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from fxprune.rules.registry import aten_overloads, register

aten = torch.ops.aten

# ops whose output holds the same values as their first argument (export lifts `torch.tensor([-2])` as
# get_attr -> lift_fresh_copy)
_SAME_VALUES = {"lift_fresh_copy", "clone", "detach", "alias", "contiguous", "_to_copy", "to"}


def constant_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The values of ``node`` when it is a constant tensor of the module (through copies and casts), else None.

    Example: export's ``lift_fresh_copy(_lifted_tensor_0)`` gives the lifted ``tensor([-2])``; an activation,
    a value on the meta device (no values) or anything computed gives None.
    """
    while isinstance(node, fx.Node) and node.op == "call_function":
        name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
        if name not in _SAME_VALUES or not node.args:
            return None
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = operator.attrgetter(node.target)(gm)
    except AttributeError:
        return None
    if not isinstance(value, torch.Tensor) or value.is_meta or isinstance(value, torch._subclasses.FakeTensor):
        return None
    return value.detach()


def add_constant(node: fx.Node, value: torch.Tensor, stem: str) -> fx.Node:
    """Register ``value`` as a non-persistent buffer of ``node``'s graph module; a ``get_attr`` of it before ``node``.

    Non-persistent like export's lifted constants: the value moves with ``.to(device)`` and is no weight.
    """
    gm = node.graph.owning_module
    name, i = f"_fxprune_{stem}", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value.contiguous(), persistent=False)
    with node.graph.inserting_before(node):
        return node.graph.get_attr(f"{name}_{i}")


_ARANGES = (torch.arange, *aten_overloads("arange"))


def is_literal_arange(node) -> bool:
    """Whether ``node`` is an ``arange`` call whose bounds are all written in the graph (no run-time size)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ARANGES
            and not any(isinstance(v, fx.Node) for v in (*node.args, *node.kwargs.values())))


@register(*_ARANGES)
def arange(r) -> None:
    """``torch.arange``: literal bounds give known values, sliced at rewrite; a bound read at run time freezes."""
    out = r.out
    if out is None:
        return
    if not is_literal_arange(r.node):
        r.freeze(out, "positions from torch.arange")
        return
    r.sliced_constant(out[0])
    r.on_rewrite(_keep_values(out[0]))


def _keep_values(axis):
    """Rewrite hook: the call's output at the kept indices of ``axis``, as a constant buffer."""

    def hook(node: fx.Node, sizes) -> None:
        if sizes.new(axis) == sizes.old(axis):
            return
        with torch.no_grad():
            values = node.target(*node.args, **node.kwargs)
            keep = torch.as_tensor(sizes.indices(axis), dtype=torch.long, device=values.device)
            constant = add_constant(node, values.index_select(0, keep), node.name)
        node.replace_all_uses_with(constant)
        node.graph.erase_node(node)

    return hook


def constant_positions(r, x, dim: int, index, slot: int) -> bool:
    """``x[..., idx, ...]`` along ``dim`` with a constant 1-d integer ``idx``: each picked position becomes a
    unit of its own (a size-1 segment of ``x[dim]``) and the index is rewritten to where it lands after pruning.

    Returns False (nothing related) when ``idx`` is no such constant. ``slot`` is the index's place in
    ``aten.index``'s list. Example: ``qkv`` viewed as
    ``(B, S, H + 2, D)`` and indexed by ``[-2]``: ``qkv[2] = Cat(a(H), k(1), v(1))``, ``a`` stays prunable.
    """
    values = constant_value(r.state.gm, index)
    n = x.shape[dim]
    if values is None or values.ndim != 1 or values.dtype in (torch.bool, torch.uint8) or values.is_floating_point():
        return False
    picked = values.tolist()
    if not picked or any(not -n <= v < n for v in picked):
        return False
    positions = sorted({v % n for v in picked})
    cuts = sorted({0, n, *positions, *(p + 1 for p in positions)})
    parts = [r.fresh(e - s, f"segments around constant positions {r.where}") for s, e in zip(cuts, cuts[1:])]
    r.concat(x[dim], parts)
    for s, part in zip(cuts, parts):
        if s in positions:
            r.freeze(part, "picked by a constant index")
    r.on_rewrite(_moved_positions(x[dim], picked, slot))
    return True


def _moved_positions(axis, picked: list[int], slot: int):
    """Rewrite hook: the constant index of ``aten.index``'s ``slot`` moved to where its units are kept."""

    def hook(node: fx.Node, sizes) -> None:
        n_old, n_new = sizes.old(axis), sizes.new(axis)
        kept = sizes.indices(axis)
        moved = []
        for v in picked:
            at = int(np.searchsorted(kept, v % n_old))
            moved.append(at - n_new if v < 0 else at)  # a position from the end stays one from the end
        if moved == picked:
            return
        indices = list(node.args[1])
        old = constant_value(node.graph.owning_module, indices[slot])
        like = dict(dtype=old.dtype, device=old.device) if old is not None else dict(dtype=torch.long)
        indices[slot] = add_constant(node, torch.tensor(moved, **like), node.name)
        node.args = (node.args[0], indices, *node.args[2:])

    return hook

