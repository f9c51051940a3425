"""The Linear layers of a captured graph whose input axis (weight axis 1) holds a prunable group.

Three spellings are recognised: an ``nn.Linear`` module call, ``F.linear`` (``torch._C._nn.linear`` in a
traced graph) and ``aten.linear`` (an exported graph), each with its weight (and bias) a parameter of the
graph (a ``get_attr``). Several calls of one weight (a shared layer) are one consumer.

Example: in ``Linear(3, 4) -> ReLU -> Linear(4, 2)`` the second layer consumes the 4 hidden units::

    >>> [c.weight for c in linear_consumers(fxprune.analyze(model, (x,)))]
    ['2.weight']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclass
class Consumer:
    weight: str  # parameter name of the weight (out_features, in_features)
    bias: str | None  # parameter name of the bias, None without one
    calls: list = field(default_factory=list)  # (linear call node, its input node) for each use
    groups: list = field(default_factory=list)  # prunable groups in the weight's axis 1


def _linear_call(gm: fx.GraphModule, node: fx.Node):
    """``(input node, weight name, bias name)`` of a Linear call, else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        module = gm.get_submodule(node.target)
        bias = f"{node.target}.bias" if module.bias is not None else None
        x = node.args[0] if node.args else node.kwargs.get("input")
        return x, f"{node.target}.weight", bias
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        args = list(node.args) + [node.kwargs.get(k) for k in ("input", "weight", "bias")[len(node.args):]]
        x, weight, bias = (args + [None, None, None])[:3]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return None  # a computed bias cannot be refit
        return x, weight.target, bias.target if bias is not None else None
    return None


def linear_consumers(dg) -> dict[str, Consumer]:
    """``{weight name: Consumer}`` for every Linear whose input axis holds a prunable group."""
    out: dict[str, Consumer] = {}
    for node in dg.gm.graph.nodes:
        call = _linear_call(dg.gm, node)
        if call is None or not isinstance(call[0], fx.Node):
            continue
        x, weight, bias = call
        try:
            groups = [g for g in dg.groups_of(weight, 1) if g.prunable]
        except KeyError:
            continue
        if groups:
            consumer = out.setdefault(weight, Consumer(weight, bias, groups=groups))
            consumer.calls.append((node, x))
    return out

