"""Depth rewrite: residual branches and whole layers out of a graph.

A removed branch's add becomes its stream operand (``y = x + f(x)`` -> ``y = x``); a removed layer's output
becomes the stream that enters it. The nodes of the branch (layer) are erased, and so are the parameters,
buffers and submodules only they used (a module the rest of the graph still calls, such as a ReLU a ResNet
block applies before and after its add, stays), and every module left empty by that (``layer1.1``). Branches
and layers come from :mod:`fxprune.analysis.branches` by node name, so the rewrite works on a copy of the
analysed graph. The result is a new GraphModule (the analysed one with ``inplace=True``); the caller verifies
it (:func:`fxprune.rewriting.verify.verify`), as for width pruning. ``gm.meta["fxprune_depth"]`` records what
was removed: ``{"branches": [{"add", "owner", "kind"}], "layers": [names]}``.

Example::

    >>> dg = fxprune.analyze(model, (ids,))
    >>> gm = remove_depth(dg, branches=[b for b in dg.branches if b.kind == "attention"][:1])
    >>> verify(gm, dg.example_inputs, dg.expected_shapes)
"""

from __future__ import annotations

import copy

import torch.fx as fx

from fxprune.dotted import owner_of
from fxprune.errors import PlanError

DEPTH_META = "fxprune_depth"  # gm.meta key: what depth pruning removed


def remove_depth(dg, branches=(), layers=(), inplace: bool = False, share_tensors: bool = False) -> fx.GraphModule:
    """A GraphModule without the given branches and layers (``Branch``/``Layer`` objects of ``dg``, or ids of
    ``dg.branches`` / names of ``dg.layers``). A branch inside a removed layer or branch goes with it.

    ``share_tensors=True``: the copy keeps the original parameters (a throwaway copy whose tensors are read,
    never written: in-place pruning compares against it).
    """
    branches = [dg.branches[b] if isinstance(b, int) else b for b in branches]
    by_name = {layer.name: layer for layer in dg.layers}
    layers = [by_name[layer] if isinstance(layer, str) else layer for layer in layers]
    for item in (*branches, *layers):
        if not item.removable:
            what = f"branch B{item.id} ({item.owner})" if hasattr(item, "add") else f"layer {item.name}"
            raise PlanError(f"{what} cannot be removed: {item.reason}")
    if inplace:
        gm = dg.gm
    else:
        memo = {id(t): t for t in (*dg.gm.parameters(), *dg.gm.buffers())} if share_tensors else {}
        gm = copy.deepcopy(dg.gm, memo)
    nodes = {n.name: n for n in gm.graph.nodes}
    erased: set[str] = set()
    targets: set[str] = set()
    replaced: dict[str, str] = {}  # a bypassed output -> the stream that now stands for it
    for layer in layers:
        _bypass(gm, nodes, layer.output, layer.input, layer.nodes, erased, targets, replaced)
    # outer branches first: an inner one goes with it
    for branch in sorted(branches, key=lambda b: -len(b.nodes)):
        if branch.add in erased:
            continue
        _bypass(gm, nodes, branch.add, branch.stream, (*branch.nodes, branch.add), erased, targets, replaced)
    _delete_unused(gm, targets)
    gm.graph.lint()
    gm.recompile()
    record = gm.meta.setdefault(DEPTH_META, {"branches": [], "layers": []})
    record["branches"] += [{"add": b.add, "owner": b.owner, "kind": b.kind} for b in branches]
    record["layers"] += [layer.name for layer in layers]
    return gm


def _bypass(gm, nodes: dict, output: str, stream: str, names, erased: set, targets: set, replaced: dict) -> None:
    """Every use of ``output`` reads ``stream`` instead (or what stands for it: the stream of an earlier block
    may have been bypassed already); the nodes ``names`` are erased (users first)."""
    if output in erased:
        return
    while stream in replaced:
        stream = replaced[stream]
    nodes[output].replace_all_uses_with(nodes[stream])
    replaced[output] = stream
    for name in sorted(names, key=_position(gm), reverse=True):
        if name in erased or name == stream:
            continue
        node = nodes[name]
        if node.users:  # read by a node that stays: a bug in the analysis, never a silent wrong graph
            raise PlanError(f"cannot remove node {name!r}: {[u.name for u in node.users]} still read it")
        if node.op in ("get_attr", "call_module"):
            targets.add(node.target)
        gm.graph.erase_node(node)
        erased.add(name)


def _position(gm):
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return lambda name: order.get(name, -1)


def _delete_unused(gm: fx.GraphModule, targets: set) -> None:
    """Parameters, buffers and submodules named by ``targets`` that no node uses any more, then the modules
    they leave empty."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def in_use(path: str) -> bool:
        return any(u == path or u.startswith(path + ".") for u in used)

    for target in sorted(targets, key=lambda t: -t.count(".")):
        if in_use(target):
            continue
        try:
            owner, attr = owner_of(gm, target)
        except AttributeError:
            continue
        if attr in owner._modules:
            del owner._modules[attr]
        elif attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        elif hasattr(owner, attr):
            delattr(owner, attr)
        # modules left without parameters, buffers or children, that nothing calls
        path = target.rpartition(".")[0]
        while path and not in_use(path):
            module = gm.get_submodule(path)
            if module._parameters or module._buffers or module._modules:
                break
            parent, name = owner_of(gm, path)
            del parent._modules[name]
            path = path.rpartition(".")[0]
