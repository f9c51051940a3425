"""Rewrite: slice parameters and buffers, resize module attributes, recompute shape constants.

Everything is driven by the solved layouts: a tensor axis keeps the flat
indices :func:`fxprune.algebra.layout.kept_indices` returns; a shape constant (a view
size, a split list, ``in_channels``, ``num_groups`` ...) becomes the new size of
its layout. A constant whose size does not change is left exactly as written,
so ``-1``, ``x.size(0)`` and other symbolic sizes survive.

Example: pruning 2 of 8 heads of a ``view(B, N, 8, 64)`` rewrites it to
``view(B, N, 6, 64)`` and slices 128 rows out of the q/k/v projections.

The result is a new GraphModule (``dg.gm`` is left as it was; in place, a throwaway copy: :func:`rewrite`) with
sliced tensors, resized module attributes, rewritten shape constants and recompiled code (how each kind of constant
is rewritten: ``fxprune.algebra.context``). Dead-code elimination removes only the torch/``operator`` size
arithmetic that rewriting made dead, never a call of the model's own functions or modules (MViT's ``_add_shortcut``
is called for its in-place side effect).
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.fx as fx

from fxprune.dotted import owner_of
from fxprune.algebra.layout import kept_indices, new_size
from fxprune.analysis.removal import kept_units


class Sizes:
    """Old and new sizes of any layout under a pruning plan (what rewrite hooks receive)."""

    def __init__(self, solver, kept: dict[int, np.ndarray]):
        self.solver, self.kept = solver, kept
        self.ints: dict[str, object] = {}  # node name -> its int value in the pruned graph

    def new(self, layout) -> int:
        return new_size(self.solver.resolve(layout), self.kept, self.solver)

    def old(self, layout) -> int:
        return self.solver.resolve(layout).size(self.solver)

    def indices(self, layout) -> np.ndarray:
        return kept_indices(self.solver.resolve(layout), self.kept, self.solver)


def rewrite(dg, removal: dict, share_tensors: bool = False) -> fx.GraphModule:
    """A new GraphModule with the units removed (``dg.gm`` is left as it was).

    ``share_tensors=True`` is for a throwaway copy (in-place pruning writes the resized tensors into the
    caller's model and drops it: :mod:`fxprune.rewriting.inplace`): the copy's unchanged parameters are the
    original objects instead of clones, which saves copying the whole model (~6 s and 4 GB on a 1B LLaMA).
    Resized tensors are always new (``index_select`` copies).
    """
    sizes = Sizes(dg.solver, kept_units(dg, removal))
    memo = {id(t): t for t in (*dg.gm.parameters(), *dg.gm.buffers())} if share_tensors else {}
    gm = copy.deepcopy(dg.gm, memo)
    nodes = {n.name: n for n in gm.graph.nodes}
    with torch.no_grad():
        _slice_tensors(gm, dg, sizes)
    modules = dict(gm.named_modules())
    sizes.ints = _new_int_values(dg, sizes)
    for c in dg.state.constants:
        _rewrite_constant(nodes[c.node.name], modules.get(c.node.target), c, sizes)
    for node, hook in dg.state.hooks:
        hook(nodes[node.name], sizes)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm


def changed_axes(dg, sizes: Sizes) -> dict[str, dict[int, object]]:
    """``{tensor name: {axis: layout}}`` of every parameter or buffer axis that changes size under the plan.

    Names are the graph's canonical ones (a tied tensor appears once, under its first name:
    ``dg.state.canonical``); ``sizes.indices(layout)`` gives the flat indices an axis keeps.
    """
    by_key: dict[str, dict[int, object]] = {}
    for (key, dim), layout in dg.layouts.items():
        if key[0] == "p":
            by_key.setdefault(key[1], {})[dim] = layout
    out = {}
    for name, dims in by_key.items():
        changed = {d: layout for d, layout in dims.items() if sizes.new(layout) != sizes.old(layout)}
        if changed:
            out[name] = changed
    return out


def sliced(tensor: torch.Tensor, changed: dict[int, object], sizes: Sizes) -> torch.Tensor:
    """``tensor`` with each axis in ``changed`` (``{axis: layout}``, from :func:`changed_axes`) cut to its kept
    indices (``index_select`` copies; with no axis to cut, ``tensor`` itself)."""
    for d, layout in sorted(changed.items()):
        index = torch.as_tensor(sizes.indices(layout), dtype=torch.long, device=tensor.device)
        tensor = tensor.index_select(d, index)
    return tensor


def _slice_tensors(gm: fx.GraphModule, dg, sizes: Sizes) -> None:
    aliases: dict[str, list[str]] = {}
    for alias, name in dg.state.canonical.items():
        aliases.setdefault(name, []).append(alias)
    for name, changed in changed_axes(dg, sizes).items():
        old = operator.attrgetter(name)(gm)
        new = sliced(old.detach(), changed, sizes)
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        else:
            new = new.contiguous()
        for alias in aliases.get(name, [name]):
            _set(gm, alias, new)


def _set(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    module, attr = owner_of(gm, name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, value)  # RNN modules refresh their flat weights on setattr


def _rewrite_constant(node: fx.Node, module, c, sizes: Sizes) -> None:
    kind, where = c.source[:2]
    index = c.index
    if c.source[-1] == "wrapped":  # an aten list argument the rule saw as ``*shape``
        index = None
    if kind == "attr":
        if module is not None:
            owner, attr = owner_of(module, where)  # a dotted attribute belongs to a submodule
            setattr(owner, attr, _updated(getattr(owner, attr), c.layouts, index, sizes))
        return
    if kind == "kwargs":
        node.kwargs = {**node.kwargs, where: _updated(node.kwargs[where], c.layouts, index, sizes, node)}
        return
    args = list(node.args)
    if kind == "star":
        args[where:] = list(_updated(tuple(args[where:]), c.layouts, index, sizes, node))
    else:
        args[where] = _updated(args[where], c.layouts, index, sizes, node)
    node.args = tuple(args)


def _updated(value, layouts, index, sizes: Sizes, at: fx.Node | None = None):
    """``value`` with each entry whose layout changed size replaced by the new size (``at``: the node whose
    argument it is, before which a rewritten size computation goes)."""
    if index is not None:
        items = list(value)
        items[index] = _updated(items[index], layouts, None, sizes, at)
        return type(value)(items) if isinstance(value, (tuple, list)) else tuple(items)
    if isinstance(layouts, list):
        items = [v if layout is None else _updated(v, layout, None, sizes, at) for v, layout in zip(value, layouts)]
        return list(items) if isinstance(value, list) else tuple(items)
    new = sizes.new(layouts)
    if isinstance(value, fx.Node):  # a computed size (x.size(1) // heads): keep it if it still is right
        if sizes.ints.get(value.name, value.meta.get("val")) == new:
            return value
        resized = _with_new_literal(value, new, sizes, at) if at is not None else None
        return new if resized is None else resized
    return value if new == sizes.old(layouts) else new


def _with_new_literal(value: fx.Node, new: int, sizes: Sizes, at: fx.Node) -> fx.Node | None:
    """``batch * heads`` (``mul(sym_size, 4)``) with the literal solved for the new size (``mul(sym_size, 3)``),
    as a new node before ``at``, so the size still follows the run-time operand; None when ``value`` is not
    one run-time size times (or floor-divided by) a literal, or no literal gives ``new``.

    Replacing the whole computation by the int ``new`` would bake in the example's batch size.
    """
    if value.op != "call_function" or value.target not in (operator.mul, operator.floordiv) or len(value.args) != 2:
        return None
    slot = next((i for i, a in enumerate(value.args) if isinstance(a, int) and not isinstance(a, bool)), None)
    other = value.args[1 - slot] if slot is not None else None
    if not isinstance(other, fx.Node):
        return None
    known = sizes.ints.get(other.name, other.meta.get("val"))
    try:
        known = int(known)
    except (TypeError, ValueError):
        return None
    if value.target is operator.mul:
        literal = new // known if known and new % known == 0 else None
    else:  # other // literal
        literal = known // new if slot == 1 and new and known % new == 0 and known // (known // new) == new else None
    if not literal:
        return None
    args = list(value.args)
    args[slot] = literal
    with at.graph.inserting_before(at):
        resized = at.graph.call_function(value.target, tuple(args))
    resized.meta = {**value.meta, "val": new}
    sizes.ints[resized.name] = new
    return resized


_INT_OPS = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: operator.floordiv, operator.mod: operator.mod, operator.neg: operator.neg,
}


def _new_int_values(dg, sizes: Sizes) -> dict[str, object]:
    """Evaluate the graph's size arithmetic (``x.shape``, ``x.size(d)``, ``C // heads`` ...) at the new sizes.

    Only nodes whose value is an int or a tuple of ints are evaluated; anything
    this does not understand keeps its old value.
    """
    values: dict[str, object] = {}

    def new_shape(node):
        val = node.meta.get("val")
        key = dg.state.param_key(node.target) if node.op == "get_attr" else ("v", node.name, ())
        return tuple(sizes.new(dg.layouts[(key, d)]) if (key, d) in dg.layouts else int(val.shape[d])
                     for d in range(val.ndim))

    def value(arg):
        if isinstance(arg, fx.Node):
            return values.get(arg.name, arg.meta.get("val"))
        return arg

    for node in dg.gm.graph.nodes:
        val = node.meta.get("val")
        if node.op not in ("call_function", "call_method"):
            continue
        args = node.args
        if node.target is torch.ops.aten.sym_size.int:
            values[node.name] = new_shape(args[0])[args[1]]
        elif node.target in ("size", getattr) or (node.op == "call_method" and node.target == "size"):
            src = args[0]
            if not isinstance(src.meta.get("val"), torch.Tensor):
                continue
            if node.target is getattr and args[1] != "shape":
                continue
            shape = new_shape(src)
            dim = args[1] if node.target == "size" and len(args) > 1 else node.kwargs.get("dim")
            values[node.name] = shape if dim is None else shape[dim]
        elif node.target is operator.getitem and isinstance(value(args[0]), (tuple, list, torch.Size)) and (
                isinstance(val, int) or isinstance(val, (tuple, list))):
            try:
                values[node.name] = value(args[0])[args[1]]
            except (TypeError, IndexError):
                continue
        elif node.target in _INT_OPS and isinstance(val, int):
            operands = [value(a) for a in args]
            if all(isinstance(v, int) for v in operands):
                values[node.name] = _INT_OPS[node.target](*operands)
    return values


_PURE_MODULES = ("torch", "operator", "_operator", "builtins", "math")


def _is_impure(node: fx.Node) -> bool:
    """Nodes that must survive dead-code elimination although nothing uses their result.

    In-place ops (``y.mul_(2)``); and calls of the model's own functions and modules,
    which may mutate their inputs: torchvision's MViT calls ``_add_shortcut(x, q)``
    (a ``torch.fx.wrap``ped ``x.add_(q)``) for its side effect only. Only the size
    arithmetic that rewriting makes dead (torch ops, ``operator``, ``getattr``) is removed.
    """
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.is_impure() or name.split(".")[0].endswith("_") or node.op == "call_module":
        return True
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return module.split(".")[0] not in _PURE_MODULES
    return False
