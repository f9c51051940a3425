"""Count multiply-accumulates and parameters from an fx graph with FakeTensor shapes.

Counted ops: convolutions (and transposed), linear, matmul/mm/bmm/addmm/baddbmm,
einsum, scaled dot-product attention, and LSTM/GRU/RNN. Elementwise ops, norms
and pooling are not counted (the fvcore/thop convention for MACs).

Example::

    >>> macs, params = fxprune.count(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> round(macs / 1e9, 2), params
    (1.82, 11689512)
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.capture import capture, flat_inputs
from fxprune.propagate import propagate

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", torch.addmm, torch.baddbmm,
           "addmm", "baddbmm"}
_RNN_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def count(model, example_inputs) -> tuple[int, int]:
    """``(macs, params)`` of a model or GraphModule for the given inputs."""
    captured = capture(model, example_inputs)
    gm = fx.GraphModule(captured, copy.deepcopy(captured.graph))
    gm.meta.update(captured.meta)
    propagate(gm, flat_inputs(gm, example_inputs))
    params = sum(p.numel() for p in gm.parameters())
    modules = dict(gm.named_modules())
    return sum(_node_macs(n, modules) for n in gm.graph.nodes), params


def count_macs(model, example_inputs) -> int:
    return count(model, example_inputs)[0]


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node):
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _node_macs(node: fx.Node, modules: dict) -> int:
    out = _val(node)
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _CONV):
            return out.numel() * m.weight.shape[1] * math.prod(m.weight.shape[2:])
        if isinstance(m, _CONV_T):
            return _val(node.args[0]).numel() * m.weight.shape[1] * math.prod(m.weight.shape[2:])
        if isinstance(m, nn.Linear):
            return out.numel() * m.in_features
        for cls, gates in _RNN_GATES.items():
            if isinstance(m, cls):
                return _rnn_macs(m, gates, _shape(node.args[0]))
        if isinstance(m, nn.MultiheadAttention):
            q = _shape(node.args[0])
            k = _shape(node.args[1])
            e = m.embed_dim
            tokens_q, tokens_k = math.prod(q[:-1]), math.prod(k[:-1])
            seq_k = k[1] if m.batch_first else k[0]
            return 4 * tokens_q * e * e // 2 + 2 * tokens_k * e * e // 2 + 2 * tokens_q * seq_k * e
        return 0
    if node.op not in ("call_function", "call_method"):
        return 0
    target = node.target
    if target in (F.conv1d, F.conv2d, F.conv3d):
        w = _shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
        return out.numel() * math.prod(w[1:])
    if target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        w = _shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
        return _val(node.args[0]).numel() * math.prod(w[1:])
    if target is F.linear:
        w = _shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
        return out.numel() * w[-1]
    if target in _MATMUL:
        a = node.args[1] if target in (torch.addmm, torch.baddbmm, "addmm", "baddbmm") else node.args[0]
        return out.numel() * _shape(a)[-1] if isinstance(out, torch.Tensor) and _shape(a) else 0
    if target is F.scaled_dot_product_attention:
        q, k, v = (_shape(a) for a in node.args[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    if target is torch.einsum:
        return _einsum_macs(node)
    return 0


def _rnn_macs(m, gates: int, x_shape) -> int:
    steps_batch = math.prod(x_shape[:-1])
    dirs = 2 if m.bidirectional else 1
    total, inp = 0, m.input_size
    for _ in range(m.num_layers):
        total += dirs * steps_batch * gates * m.hidden_size * (inp + m.hidden_size)
        inp = m.hidden_size * dirs
    return total


def _einsum_macs(node: fx.Node) -> int:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    specs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for spec, op in zip(specs, operands):
        shape = _shape(op)
        if shape is None or "..." in spec:
            return 0
        sizes.update(zip(spec, shape))
    return math.prod(sizes.values())
