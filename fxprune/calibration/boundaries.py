"""The residual stream's layer boundaries, found from a graph: where a residual branch rejoins the stream.

A residual boundary is an addition ``x + f(x)`` of two tensors of one shape where ``x`` is an ancestor of
``f(x)`` and the branch between them holds a layer with weights (a Linear, a convolution, a matmul with a
parameter): the end of an attention or MLP sub-block of a transformer, of a residual block of a ResNet. Adds
of unrelated tensors (token + position embeddings, attention scores + mask) and adds within an activation
function (``x + 0.044715 x^3`` of the tanh GELU: no weights between) are not boundaries. Pruning widths
never removes a layer, so a pruned graph has the boundaries of its original, in the same order
(:func:`fxprune.calibration.distill.distill` pairs them by position).

Example: a two-block MLP-mixer-style stack ``x + fc2(gelu(fc1(x)))`` twice::

    >>> [n.name for n in residual_boundaries(fx.symbolic_trace(model))]
    ['add', 'add_1']
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
WEIGHTED = {torch.nn.functional.linear, torch.matmul, torch.mm, torch.addmm, torch.conv1d, torch.conv2d,
            torch.conv3d, aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
            aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}
SEARCH_LIMIT = 4000  # nodes walked back from one operand looking for the other


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "add_", "__add__", "__iadd__")
    return node.op == "call_function" and node.target in ADDS


def _weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies weights: a module with parameters, or a linear/conv/matmul op reading a parameter."""
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters(recurse=False))
    if node.op == "call_function" and node.target in WEIGHTED or (
            node.op == "call_method" and node.target in ("matmul", "mm", "__matmul__")):
        return any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.all_input_nodes) or any(
            isinstance(a, fx.Node) and a.op == "call_function" and any(
                b.op == "get_attr" for b in a.all_input_nodes) for a in node.all_input_nodes)
    return False


def _branch(gm: fx.GraphModule, start: fx.Node, stop: fx.Node) -> bool | None:
    """Walking back from ``start``: None when ``stop`` is not reached, else whether a weighted node was passed."""
    seen, stack, found, weighted = {start}, [start], False, False
    while stack and len(seen) < SEARCH_LIMIT:
        node = stack.pop()
        if node is stop:
            found = True
            continue  # not past the stream's value
        weighted = weighted or _weighted(gm, node)
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return weighted if found else None


def _shape(node):
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    return tuple(value.shape) if value is not None and hasattr(value, "shape") else None


def residual_boundaries(gm: fx.GraphModule) -> list[fx.Node]:
    """The residual boundaries of ``gm`` in graph order (see the module)."""
    out = []
    for node in gm.graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        shape_a, shape_b = _shape(a), _shape(b)
        if shape_a is not None and shape_b is not None and shape_a != shape_b:
            continue  # a broadcast add (a bias, a mask), not the stream plus a branch
        for stream, branch in ((a, b), (b, a)):
            if _branch(gm, branch, stream):
                out.append(node)
                break
    return out
