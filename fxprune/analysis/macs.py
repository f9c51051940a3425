"""Count multiply-accumulates (MACs) and parameters from an fx graph with FakeTensor shapes.

The convention is fvcore's (``fvcore.nn.FlopCountAnalysis``, whose "flops" are
MACs for conv and matmul), chosen because fvcore, like fxprune, counts ops in a
graph rather than hooked modules:

======================================  ===============================================
op                                      MACs
======================================  ===============================================
conv / transposed conv                  one per weight tap per output (per input for
                                        transposed) element; bias not counted
linear, matmul, mm, bmm, addmm, einsum  one per multiply of the product
scaled_dot_product_attention,           q @ k^T and attn @ v (fvcore cannot see inside
nn.MultiheadAttention, Swin attention   sdpa and counts 0 there; the matmuls are counted
                                        here as the matmuls they are)
batch norm (inference)                  1 per element, 2 with affine
layer / group / instance norm           4 per element, 5 with affine
adaptive average pooling                1 per input element
upsample nearest / bilinear             1 / 4 per output element
LSTM / GRU / RNN                        the gate matmuls of every step, layer, direction
======================================  ===============================================

Everything else (activations, residual adds, max and fixed-window pooling,
softmax, reductions) counts 0, as in fvcore. On torchvision's CNNs the totals
agree with fvcore within 1% (``benchmarks/macs_vs_fvcore.py``).

Example::

    >>> macs, params = fxprune.count(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> round(macs / 1e9, 3), params
    (1.819, 11689512)
"""

from __future__ import annotations

import copy
import inspect
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.analysis.capture import EXPORTED, capture, flat_inputs
from fxprune.analysis.propagate import propagate, reuse_export_values
from fxprune.rules.registry import by_function
from fxprune.analysis.shapes import GraphShapes, PlannedShapes

aten = torch.ops.aten


def count(model, example_inputs, *, by_module: bool = False):
    """``(macs, params)`` of a model or GraphModule for the given inputs (shapes only, no real compute).

    ``by_module=True``: ``{module name: (macs, params)}`` instead, for every module that runs ops with MACs
    or owns parameters. A module's MACs are those of the ops that run directly in it (not in a submodule;
    ``nn_module_stack``), its parameters those it owns directly (a tied tensor counts once, for its first
    owner); ``""`` is the top level. The values sum to the totals.
    """
    gm = counted_graph(model, example_inputs)
    return module_counts(gm) if by_module else count_graph(gm)


def counted_graph(model, example_inputs) -> fx.GraphModule:
    """A fresh captured graph of ``model`` with FakeTensor shapes, only to be counted."""
    captured = capture(model, example_inputs, dynamic=False)
    gm = fx.GraphModule(captured, copy.deepcopy(captured.graph))
    gm.meta.update(captured.meta)
    # exported here from these inputs (not the caller's graph): export's static shapes are the propagated ones
    fresh = captured is not model and gm.meta.get("fxprune_capture") == EXPORTED
    if not (fresh and reuse_export_values(gm)):
        propagate(gm, flat_inputs(gm, example_inputs))
    return gm


def module_counts(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """``{module name: (macs, params)}`` over a counted graph (see :func:`count`)."""
    macs = macs_by_module(gm)
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    for name, module in gm.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        params = sum(p.numel() for p in own)
        if params or macs.get(name):
            out[name] = (macs.get(name, 0), params)
    for name, value in macs.items():  # ops attributed to a module path the graph does not hold
        if name not in out:
            out[name] = (value, 0)
    return out


def count_macs(model, example_inputs) -> int:
    return count(model, example_inputs)[0]


def count_graph(gm: fx.GraphModule, shapes: GraphShapes | None = None) -> tuple[int, int]:
    """``(macs, params)`` of a GraphModule whose nodes already carry ``meta["val"]``."""
    shapes = shapes or GraphShapes(gm)
    modules = dict(gm.named_modules())
    return sum(node_macs(n, modules, shapes) for n in gm.graph.nodes), shapes.parameter_count()


def estimate(dg, removal: dict) -> tuple[int, int]:
    """``(macs, params)`` that ``fxprune.apply(dg, removal)`` would have, without rewriting anything."""
    return count_graph(dg.gm, PlannedShapes(dg, removal))


def macs_by_module(gm: fx.GraphModule, shapes: GraphShapes | None = None) -> dict[str, int]:
    """MACs attributed to the innermost module each op runs in (``""`` for the top level)."""
    shapes = shapes or GraphShapes(gm)
    modules = dict(gm.named_modules())
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        macs = node_macs(node, modules, shapes)
        if macs:
            owner = _owner(node)
            out[owner] = out.get(owner, 0) + macs
    return out


def _owner(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""
    return ""


# -- per-op counts --------------------------------------------------------
def node_macs(node: fx.Node, modules: dict, shapes: GraphShapes) -> int:
    if node.op == "call_module":
        module = modules[node.target]
        for cls in type(module).__mro__:
            if cls in _MODULES:
                return int(_MODULES[cls](node, module, shapes))
        return 0
    if node.op in ("call_function", "call_method"):
        handler = _FUNCTIONS.get(node.target) if node.op == "call_method" else by_function(_FUNCTIONS, node.target)
        return int(handler(node, shapes)) if handler is not None else 0
    return 0


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


# modules: f(node, module, shapes)
def _conv_module(node, m, shapes):
    w = shapes.param(f"{node.target}.weight")
    return _numel(shapes.node(node)) * math.prod(w[1:])


def _conv_t_module(node, m, shapes):
    w = shapes.param(f"{node.target}.weight")
    return _numel(shapes.node(node.args[0])) * math.prod(w[1:])


def _linear_module(node, m, shapes):
    return _numel(shapes.node(node)) * shapes.param(f"{node.target}.weight")[1]


def _rnn_module(node, m, shapes):
    x = shapes.node(node.args[0])
    steps_batch = _numel(x[:-1]) if x else 0
    total = 0
    for name, _ in m.named_parameters():
        if name.startswith(("weight_ih", "weight_hh")):
            total += _numel(shapes.param(f"{node.target}.{name}"))
    return steps_batch * total


def _mha_module(node, m, shapes):
    q, k = shapes.node(node.args[0]), shapes.node(node.args[1])
    inner = m.num_heads * m.head_dim  # embed_dim, unless pruning made it a PrunedMultiheadAttention
    tokens_q, tokens_k = _numel(q[:-1]), _numel(k[:-1])
    seq_k = k[1] if m.batch_first and len(k) == 3 else k[0]
    projections = tokens_q * inner * (m.embed_dim + m.out_proj.out_features) + tokens_k * inner * (m.kdim + m.vdim)
    return projections + 2 * tokens_q * seq_k * inner


def _batch_norm_module(node, m, shapes):
    return _numel(shapes.node(node.args[0])) * (2 if m.affine else 1)


def _norm_module(node, m, shapes):
    affine = getattr(m, "affine", None)
    if affine is None:
        affine = getattr(m, "elementwise_affine", False)
    return _numel(shapes.node(node.args[0])) * (5 if affine else 4)


def _adaptive_avg_module(node, m, shapes):
    return _numel(shapes.node(node.args[0]))


def _upsample_module(node, m, shapes):
    return _numel(shapes.node(node)) * _UPSAMPLE.get(m.mode, 0)


_UPSAMPLE = {"nearest": 1, "bilinear": 4}

_MODULES = {
    nn.Conv1d: _conv_module, nn.Conv2d: _conv_module, nn.Conv3d: _conv_module,
    nn.ConvTranspose1d: _conv_t_module, nn.ConvTranspose2d: _conv_t_module, nn.ConvTranspose3d: _conv_t_module,
    nn.Linear: _linear_module,
    nn.LSTM: _rnn_module, nn.GRU: _rnn_module, nn.RNN: _rnn_module,
    nn.MultiheadAttention: _mha_module,
    nn.modules.batchnorm._BatchNorm: _batch_norm_module,
    nn.LayerNorm: _norm_module, nn.GroupNorm: _norm_module, nn.modules.instancenorm._InstanceNorm: _norm_module,
    nn.AdaptiveAvgPool1d: _adaptive_avg_module, nn.AdaptiveAvgPool2d: _adaptive_avg_module,
    nn.AdaptiveAvgPool3d: _adaptive_avg_module,
    nn.Upsample: _upsample_module,
}


# functions: f(node, shapes)
def _conv_fn(node, shapes):
    return _numel(shapes.node(node)) * math.prod(shapes.node(_arg(node, 1, "weight"))[1:])


def _conv_t_fn(node, shapes):
    return _numel(shapes.node(node.args[0])) * math.prod(shapes.node(_arg(node, 1, "weight"))[1:])


def _convolution_fn(node, shapes):  # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ..)
    transposed = _arg(node, 6, "transposed")
    return _conv_t_fn(node, shapes) if transposed else _conv_fn(node, shapes)


def _linear_fn(node, shapes):
    return _numel(shapes.node(node)) * shapes.node(_arg(node, 1, "weight"))[-1]


def _matmul_fn(node, shapes):
    a = shapes.node(node.args[0])
    out = shapes.node(node)
    return _numel(out) * a[-1] if a and out is not None else 0


def _addmm_fn(node, shapes):  # addmm(bias, a, b), baddbmm(bias, a, b)
    a = shapes.node(node.args[1])
    return _numel(shapes.node(node)) * a[-1] if a else 0


def _sdpa_fn(node, shapes):
    q, k, v = (shapes.node(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    return _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _einsum_fn(node, shapes):
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    specs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for spec, op in zip(specs, operands):
        shape = shapes.node(op)
        if shape is None or "..." in spec:
            return 0
        sizes.update(zip(spec, shape))
    return math.prod(sizes.values())


def _batch_norm_fn(weight_index: int):
    def count_batch_norm(node, shapes):
        weight = _arg(node, weight_index, "weight")
        return _numel(shapes.node(node.args[0])) * (2 if weight is not None else 1)

    return count_batch_norm


def _norm_fn(weight_index: int):
    def count_norm(node, shapes):
        weight = _arg(node, weight_index, "weight")
        return _numel(shapes.node(node.args[0])) * (5 if weight is not None else 4)

    return count_norm


def _adaptive_avg_fn(node, shapes):
    return _numel(shapes.node(node.args[0]))


def _interpolate_fn(node, shapes):
    mode = _arg(node, 3, "mode") or "nearest"
    return _numel(shapes.node(node)) * _UPSAMPLE.get(mode, 0)


def _aten_rnn_fn(node, shapes):
    """aten.lstm/gru/rnn_*(input, hx, params, ...): the gate matmuls of every step, layer and direction."""
    x = shapes.node(node.args[0])
    weights = [shapes.node(p) for p in node.args[2]]  # per layer and direction: w_ih, w_hh[, b_ih, b_hh]
    return _numel(x[:-1]) * sum(_numel(w) for w in weights if w is not None and len(w) == 2)


def _swin_attention_fn(node, shapes):
    """torchvision's ``shifted_window_attention`` (a leaf under ``torch.fx.wrap``): its 2 linears and 2 matmuls."""
    from torchvision.models import swin_transformer as swin

    bound = inspect.signature(swin.shifted_window_attention).bind(*node.args, **node.kwargs).arguments
    b, h, w, _ = shapes.node(bound["input"])
    window = bound["window_size"]
    qkv, proj = shapes.node(bound["qkv_weight"]), shapes.node(bound["proj_weight"])
    padded = b * (-(-h // window[0]) * window[0]) * (-(-w // window[1]) * window[1])
    per_window = window[0] * window[1]
    attention_width = qkv[0] // 3  # heads x head dim
    return padded * (qkv[0] * qkv[1] + proj[0] * proj[1] + 2 * per_window * attention_width)


_FUNCTIONS = {
    F.conv1d: _conv_fn, F.conv2d: _conv_fn, F.conv3d: _conv_fn,
    aten.conv1d.default: _conv_fn, aten.conv2d.default: _conv_fn, aten.conv3d.default: _conv_fn,
    F.conv_transpose1d: _conv_t_fn, F.conv_transpose2d: _conv_t_fn, F.conv_transpose3d: _conv_t_fn,
    aten.convolution.default: _convolution_fn, aten.conv_transpose1d.default: _conv_t_fn,
    aten.conv_transpose2d.input: _conv_t_fn, aten.conv_transpose3d.input: _conv_t_fn,
    aten.lstm.input: _aten_rnn_fn, aten.gru.input: _aten_rnn_fn, aten.rnn_tanh.input: _aten_rnn_fn,
    aten.rnn_relu.input: _aten_rnn_fn,
    F.linear: _linear_fn, aten.linear.default: _linear_fn,
    torch.matmul: _matmul_fn, operator.matmul: _matmul_fn, torch.mm: _matmul_fn, torch.bmm: _matmul_fn,
    "matmul": _matmul_fn, "mm": _matmul_fn, "bmm": _matmul_fn, "__matmul__": _matmul_fn,
    aten.matmul.default: _matmul_fn, aten.mm.default: _matmul_fn, aten.bmm.default: _matmul_fn,
    torch.addmm: _addmm_fn, torch.baddbmm: _addmm_fn, "addmm": _addmm_fn, "baddbmm": _addmm_fn,
    aten.addmm.default: _addmm_fn, aten.baddbmm.default: _addmm_fn,
    F.scaled_dot_product_attention: _sdpa_fn, aten.scaled_dot_product_attention.default: _sdpa_fn,
    torch.einsum: _einsum_fn, aten.einsum.default: _einsum_fn,
    F.batch_norm: _batch_norm_fn(3), aten.batch_norm.default: _batch_norm_fn(1),
    aten._native_batch_norm_legit_no_training.default: _batch_norm_fn(1),
    F.layer_norm: _norm_fn(2), aten.layer_norm.default: _norm_fn(2),
    F.group_norm: _norm_fn(2), aten.group_norm.default: _norm_fn(2),
    F.instance_norm: _norm_fn(3),
    F.adaptive_avg_pool1d: _adaptive_avg_fn, F.adaptive_avg_pool2d: _adaptive_avg_fn,
    F.adaptive_avg_pool3d: _adaptive_avg_fn, aten.adaptive_avg_pool2d.default: _adaptive_avg_fn,
    F.interpolate: _interpolate_fn,
    # by name (as in the rule table): no torchvision import at ``import fxprune``
    "torchvision.models.swin_transformer:shifted_window_attention": _swin_attention_fn,
}

