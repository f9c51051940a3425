"""Module attributes that the graph restates as size constants, updated from the rewritten graph.

An attention module that reshapes its output by an attribute (XGLM: ``attn_output.reshape(bsz, tgt_len,
self.embed_dim)``, the query width, which is not the hidden size once the hidden size alone is pruned) shows the
attribute's value in the captured graph as an integer argument of the ops run inside it. Rewriting changes
that argument where a pruned width changed; the attribute follows it. Which width an attribute restates is
read from the graph, not from its name.

Example::

    >>> attributes_from_constants(model, dg.gm, pruned, before)   # XGLM, hidden 64 -> 48, heads kept
    >>> model.model.layers[0].self_attn.embed_dim                 # the reshape's 64 stayed 64
    64
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


def constant_changes(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, dict[int, set]]:
    """``{module path: {old int argument: new values}}`` over every op of the graph run inside the module (the
    innermost entry of its ``nn_module_stack``), pairing each node's integer arguments with the rewritten node's.
    An argument that rewriting left alone maps to itself."""
    rewritten = {n.name: n for n in after.graph.nodes}
    changes: dict[str, dict[int, set]] = {}
    for node in before.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        other = rewritten.get(node.name)
        if node.op != "call_function" or not stack or other is None:
            continue
        old, new = _ints((node.args, node.kwargs)), _ints((other.args, other.kwargs))
        if len(old) != len(new):
            continue
        found = changes.setdefault(list(stack.values())[-1][0], {})
        for a, b in zip(old, new):
            found.setdefault(a, set()).add(b)
    return changes


def attributes_from_constants(model: nn.Module, before: fx.GraphModule, after: fx.GraphModule,
                              original: dict) -> set:
    """Correct the attributes that the updates by tensor shapes and names changed (``update_attributes``: an
    attention's ``embed_dim`` := its input width) where the module's own ops used the original value
    (``original``: ``{(id(module), attr): value}``) as an argument that rewriting mapped to one other value.
    An attribute no update changed stays (a position count that happens to equal the hidden size), as does
    one whose value rewriting mapped to several (a head count equal to a kv-group count) or that no op of its
    module used. Returns the ``"module.attr"`` names the graph decided: those corrected, and those no update
    changed whose value the module's ops still use unchanged (a rebuild from the config must not move them)."""
    decided = set()
    for path, found in constant_changes(before, after).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for attr, value in list(vars(module).items()):
            old = original.get((id(module), attr))
            if type(value) is not int or type(old) is not int or len(found.get(old, ())) != 1:
                continue
            new = next(iter(found[old]))
            if value != old or new == old:
                setattr(module, attr, new)
                decided.add(f"{path}.{attr}")
    return decided


def _ints(args) -> list:
    out = []

    def visit(a):
        if type(a) is int:
            out.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out
