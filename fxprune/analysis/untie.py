"""One copy per consumer of a tensor computed from constants that several layers share (ALiBi slopes).

BLOOM computes its ALiBi bias once, ``pow(base, arange(1, 1 + H))`` times the key positions, and hands that
one tensor to every layer. Relating the graph as it is ties the head axis of every layer to that tensor, so
every layer would have to lose the same heads. Here each consumer gets its own copy of the computation (the
nodes between the ``arange`` and the first op that reads the graph's inputs), so each layer's heads are a
group of their own, and the rewrite slices each copy's ``arange`` to that layer's kept heads
(:mod:`fxprune.rules.constants`). The copies compute the same values; the extra work is the bias itself
(batch x heads x keys per layer), no matmul.

Only computations from an ``arange`` with literal bounds are copied (the ones whose kept values rewriting can
store), and only those whose axis the first analysis found prunable (``api._solve`` then relates the graph
again): positions ``arange(S)`` of a static capture, tied to the inputs' sequence axis, are left shared. Never
anything that reads the inputs' values (sizes may be read: ``arange(kv_length)``), nor a computation with an
in-place op. Not used in place: a model pruned in place recomputes such tensors itself, so their axes are
frozen there anyway (:func:`fxprune.rewriting.inplace.freezes.freeze_computed_constants`).

Example::

    slopes = pow(full((), 0.25), arange(1, 5)); alibi = (slopes[:, None, None] * arange(S)).repeat(B, 1, 1)
    scores_0 = baddbmm(alibi, q0, k0); scores_1 = baddbmm(alibi, q1, k1)
    # after untie_constants(gm): scores_1 = baddbmm(alibi_1, q1, k1), alibi_1 from its own arange_1
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.rules.constants import is_literal_arange


def untie_constants(gm: fx.GraphModule, starts) -> int:
    """Give every consumer of a shared computation from each literal ``arange`` in ``starts`` its own copy;
    returns the copies made (0: nothing shared, and ``gm`` is left as it was).

    >>> untie_constants(gm, [arange_node])       # BLOOM with 2 layers: the second layer's baddbmm reads a copy
    1
    """
    from_input = _reads_input(gm.graph)
    copies = 0
    for node in dict.fromkeys(starts):
        if not is_literal_arange(node):
            continue
        region = _region(node, from_input)
        if any(_in_place(n) for n in region):
            continue
        sinks = list(dict.fromkeys(u for n in region for u in n.users if u not in region and not _assertion(u)))
        for sink in sinks[1:]:
            _copy_for(gm.graph, region, sink)
            copies += 1
    if copies:
        gm.graph.lint()
        gm.recompile()
    return copies


def _reads_input(graph: fx.Graph) -> set:
    """Nodes whose tensor value is computed from a graph input's values (not only from its sizes)."""
    out = set()
    for node in graph.nodes:
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            continue
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _region(start: fx.Node, from_input: set) -> list:
    """``start`` and every tensor computed from it without reading an input's values, in graph order."""
    found, frontier = {start}, [start]
    while frontier:
        for user in frontier.pop().users:
            if user not in found and user not in from_input and isinstance(user.meta.get("val"), torch.Tensor):
                found.add(user)
                frontier.append(user)
    return [n for n in start.graph.nodes if n in found]


def _copy_for(graph: fx.Graph, region: list, sink: fx.Node) -> None:
    """Copies of the region nodes ``sink`` reads (and what they read in turn), placed before ``sink``."""
    needed, stack = set(), [a for a in sink.all_input_nodes if a in region]
    members = set(region)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a in members)
    env = {}
    with graph.inserting_before(sink):
        for node in region:
            if node in needed:
                env[node] = graph.node_copy(node, lambda a: env.get(a, a))
    for original, copy in env.items():
        sink.replace_input_with(original, copy)


def _in_place(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0].endswith("_") and not name.startswith("_")


def _assertion(node: fx.Node) -> bool:
    """export's ``_assert_tensor_metadata`` and the like: no value, no users."""
    return node.meta.get("val") is None and not node.users and node.op != "output"
