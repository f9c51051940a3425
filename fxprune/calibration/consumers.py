"""The layers of a captured graph whose input axis holds a prunable group, seen as a Linear over features.

Every calibrated consumer computes ``y = M x + b`` per token, where x is one row of features and M a
matrix view of a weight parameter (a ``get_attr``; the bias, if any, one too):

- Linear: an ``nn.Linear`` module call, ``F.linear`` (``torch._C._nn.linear`` in a traced graph) or
  ``aten.linear``: ``M = W`` (out, in), input axis 1;
- a weight operand: ``x @ W``, ``torch.matmul``/``torch.mm``/``aten.mm``/``aten.matmul`` with a rank-2
  parameter as second operand, and ``torch.addmm(b, x, W)``/``aten.addmm`` (GPT-2's ``Conv1D``): ``M = W.T``,
  input axis 0. A transposed parameter (``W.T``, ``W.t()``, ``aten.t``/``numpy_T``/``permute(W, [1, 0])``,
  as Falcon's ``x @ self.weight.T``) flips the axis;
- convolutions ``nn.Conv1d/2d/3d`` (zero padding), ``F.conv1d/2d/3d``, ``aten.conv1d/2d/3d`` and
  ``aten.convolution`` (not transposed): the features are the patches (channel-major, then kernel
  positions: ``in_channels * prod(kernel)`` per output position, see :func:`patches`), so that the
  convolution is the Linear ``W.reshape(out, -1)`` over patches. A grouped convolution (``groups = g``,
  ``in_channels / g > 1``) is g such Linears side by side: output block b reads only input block b
  (``blocks = g``; block b's features are the contiguous slice b of the patches).

Mixture-of-experts weights: a 3-d parameter ``W`` (experts, ., .) applied per token by the expert the router
picked is one consumer with ``experts = E`` matrices ``M_e`` and the statistics of each expert's own tokens:

- grouped matmul over offsets (``aten._grouped_mm`` or transformers' ``grouped_mm_fallback``:
  ``y[rows of e] = x[rows of e] @ W'[e]`` with ``W' = W`` (E, in, out), input axis 1, or ``W' = W.transpose(-2,
  -1)`` (E, out, in), input axis 2): the rows of expert e are ``offs[e-1]:offs[e]``;
- batched matmul of gathered weights (transformers' ``batched_mm``): ``bmm(W[ids], x)`` (input axis 2) or
  ``bmm(x, W[ids])`` (input axis 1), token t read by expert ``ids[t]``.

Not calibrated: depthwise convolutions (one input channel per block: an input unit is an output unit, so
there is nothing to refit and the group's other members carry the score; criteria fall back to
magnitude, with a warning, when nothing else consumes the group), transposed convolutions, batched matmuls
(``bmm``) other than of gathered expert weights, a grouped matmul with a bias, ``addmm`` with
``beta``/``alpha`` other than 1, non-zero ``padding_mode``, computed weights. Several calls of one weight
(a shared layer) are one consumer; calls that view one weight in different ways are dropped.

Example: in ``Linear(3, 4) -> ReLU -> Linear(4, 2)`` the second layer consumes the 4 hidden units::

    >>> [c.weight for c in calibrated_consumers(fxprune.analyze(model, (x,))).values()]
    ['2.weight']
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, aten.linear.default)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default,
                  aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.mm, aten.mm.default, aten.matmul.default)
ADDMM_FUNCTIONS = (torch.addmm, aten.addmm.default)
TRANSPOSES = (aten.t.default, aten.numpy_T.default, torch.t)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONVND_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class Consumer:
    weight: str  # parameter name of the weight
    bias: str | None  # parameter name of the bias, None without one
    patches: dict | None = None  # patch arguments of a convolution (see `patches`); None for a Linear or matmul
    calls: list = field(default_factory=list)  # (call node, its input node) for each use
    groups: list = field(default_factory=list)  # prunable groups in the weight's input axis
    in_features: int = 0  # features per token: in_features, or in_channels * prod(kernel)
    in_axis: int = 1  # the weight's input axis: 1 (Linear, convolution), 0 (x @ W, addmm)
    blocks: int = 1  # a grouped convolution's groups: block b of outputs reads block b of the features
    experts: int = 0  # a 3-d expert weight's experts (axis 0): one matrix and one set of statistics per expert
    routes: dict = field(default_factory=dict)  # expert weights: {call node: (route kind, offsets or ids node)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input as ``(tokens, in_features)``: rows of a Linear's input, or a convolution's patches."""
        if self.patches is None:
            return x.reshape(-1, x.shape[-1])
        return patches(x, **self.patches)

    def matrices(self, w: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the matrix ``M_b`` (block outputs, block features) of the weight tensor ``w``: its
        columns are the block's features in order (``kernel`` of them per input index of the weight)."""
        if self.experts:  # expert e's matrix: W[e] (out, in), or W[e].T when W is (E, in, out)
            return [w[e] if self.in_axis == 2 else w[e].T for e in range(w.shape[0])]
        if self.in_axis == 0:
            return [w.T]
        return list(w.reshape(w.shape[0], -1).chunk(self.blocks, 0))

    def expert_rows(self, x: torch.Tensor, kind: str, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An expert weight's input as ``(features (rows, in_features), expert of each row (rows,))``.

        ``kind`` (from ``routes``): ``"offsets"``: ``x`` (S, K), ``route`` the grouped matmul's offsets (E,),
        rows past the last offset read by no expert (left out); ``"ids_left"``: ``bmm(W[ids], x)`` with ``x``
        (T, K, m); ``"ids_right"``: ``bmm(x, W[ids])`` with ``x`` (T, m, K); ``route`` the ids (T,).

        Example: offsets ``[2, 2, 5]`` put rows 0-1 on expert 0, none on expert 1, rows 2-4 on expert 2::

            >>> consumer.expert_rows(torch.ones(5, 3), "offsets", torch.tensor([2, 2, 5]))[1]
            tensor([0, 0, 2, 2, 2])
        """
        if kind == "offsets":
            rows = torch.arange(x.shape[0], device=route.device)
            ids = torch.searchsorted(route.to(torch.int64), rows, right=True).to(x.device)
            keep = ids < len(route)
            return x.reshape(x.shape[0], -1)[keep], ids[keep]
        if kind == "ids_left":  # x (T, K, m): m columns per token
            features = x.transpose(1, 2).reshape(-1, x.shape[1])
        else:  # x (T, m, K)
            features = x.reshape(-1, x.shape[-1])
        ids = route.reshape(-1).to(x.device, torch.int64)
        return features, ids.repeat_interleave(features.shape[0] // max(len(ids), 1))

    @property
    def out_axis(self) -> int:
        """The weight's output axis: 0, or 1 for ``x @ W`` / addmm (the weight is (in, out)); for an expert
        weight (E, out, in) 1, (E, in, out) 2."""
        if self.experts:
            return 3 - self.in_axis
        return 1 if self.in_axis == 0 else 0

    @property
    def kernel(self) -> int:
        """Features per input index of the weight: the kernel positions of a convolution, 1 otherwise."""
        return int(np.prod(self.patches["kernel"])) if self.patches else 1

    def __repr__(self):
        experts = f", experts={self.experts}" if self.experts else ""
        return (f"Consumer({self.weight!r}, in_axis={self.in_axis}, blocks={self.blocks}{experts}, "
                f"calls={len(self.calls)})")


def patches(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``(N * positions, C * prod(kernel))`` patches of ``x`` (N, C, *spatial) or unbatched (C, *spatial):
    channel-major, then kernel positions in row-major order, the column order of ``W.reshape(out, -1)``.
    ``padding`` is ``((left, right), ...)`` per spatial dim.

    Example: ``patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))`` equals
    ``F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, C * 9)``.
    """
    n = len(kernel)
    if x.ndim == n + 1:
        x = x[None]
    x = F.pad(x, [p for pair in reversed(padding) for p in pair])
    for d, (k, s, dil) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)  # appends the window (with dilation gaps) as a last dim
    x = x[(...,) + tuple(slice(None, None, dil) for dil in dilation)]  # (N, C, *out, *kernel)
    order = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    return x.permute(order).reshape(-1, int(np.prod(x.shape[1:2] + x.shape[2 + n:])))


def _parameter(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _weight_operand(node) -> tuple[str, bool] | None:
    """``(parameter name, transposed)`` of a weight operand: a rank-2 parameter, or its transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, False
    source = node.args[0] if node.args else None
    transposed = (
        (node.op == "call_function" and node.target in TRANSPOSES)
        or (node.op == "call_function" and node.target is aten.permute.default and list(node.args[1]) == [1, 0])
        or (node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("T",))
        or (node.op == "call_method" and node.target in ("t", "T") and len(node.args) == 1))
    if transposed and _parameter(source) is not None and _rank(source) == 2:
        return source.target, True
    return None


def _rank(node) -> int | None:
    shape = getattr(node.meta.get("val"), "shape", None) if isinstance(node, fx.Node) else None
    return None if shape is None else len(shape)


def _bound(node: fx.Node, names: tuple) -> dict:
    out = dict(zip(names, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def _tuple(v, default, n: int) -> tuple:
    v = default if v is None else v
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return v * n if len(v) == 1 else v


def _patch_args(kernel, stride, padding, dilation) -> dict:
    """``patches`` arguments of a convolution; "same" pads the odd extra on the right, as PyTorch does."""
    n = len(kernel)
    dilation = _tuple(dilation, 1, n)
    if padding == "valid":
        pairs = ((0, 0),) * n
    elif padding == "same":
        pairs = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel))
    else:
        pairs = tuple((p, p) for p in _tuple(padding, 0, n))
    return {"kernel": tuple(kernel), "stride": _tuple(stride, 1, n), "padding": pairs, "dilation": dilation}


def _conv(weight_shape, stride, padding, dilation, groups, transposed=False) -> tuple[dict, int] | None:
    """``(patch arguments, blocks)`` of a convolution that can be calibrated, else None."""
    if transposed or weight_shape is None or len(weight_shape) not in (3, 4, 5):
        return None
    groups = int(groups or 1)
    if groups > 1 and weight_shape[1] == 1:
        return None  # depthwise: an input unit is an output unit, nothing to refit
    return _patch_args(tuple(weight_shape[2:]), stride, padding, dilation), groups


def _call(gm: fx.GraphModule, node: fx.Node):
    """``(input node, weight name, bias name, patch arguments or None, in_axis, blocks)`` of a consumer
    call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs.get("input")
        bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
        if isinstance(module, nn.Linear):
            return x, f"{node.target}.weight", bias, None, 1, 1
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros":
            conv = _conv(tuple(module.weight.shape), module.stride, module.padding, module.dilation, module.groups)
            return (x, f"{node.target}.weight", bias, conv[0], 1, conv[1]) if conv else None
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    patches, blocks, in_axis = None, 1, 1
    if node.op == "call_method" and node.target in ("matmul", "__matmul__", "mm"):
        args = {"input": node.args[0], "weight": node.args[1] if len(node.args) > 1 else None}
        in_axis = 0
    elif node.op == "call_method":
        return None
    elif node.target in LINEAR_FUNCTIONS:
        args = _bound(node, ("input", "weight", "bias"))
    elif node.target in MATMUL_FUNCTIONS:
        args, in_axis = _bound(node, ("input", "other")), 0
        args["weight"] = args.pop("other", None)
    elif node.target in ADDMM_FUNCTIONS:
        bound = _bound(node, ("bias", "mat1", "mat2"))
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        args, in_axis = {"input": bound.get("mat1"), "weight": bound.get("mat2"), "bias": bound.get("bias")}, 0
    elif node.target in CONV_FUNCTIONS:
        args = _bound(node, _CONV_ARGS if node.target is aten.convolution.default else _CONVND_ARGS)
        weight = args.get("weight")
        shape = getattr(weight.meta.get("val"), "shape", None) if isinstance(weight, fx.Node) else None
        conv = _conv(None if shape is None else tuple(shape), args.get("stride"), args.get("padding"),
                     args.get("dilation"), args.get("groups"), args.get("transposed", False))
        if conv is None or _parameter(weight) is None:
            return None
        patches, blocks = conv
    else:
        return None
    operand = _weight_operand(args.get("weight"))
    bias = args.get("bias")
    if operand is None or (bias is not None and _parameter(bias) is None):
        return None  # a computed weight or bias cannot be refit
    weight, transposed = operand
    if patches is None and _rank(args.get("weight")) != 2:
        return None  # a batched matmul: no single weight matrix
    if bias is not None and _rank(bias) != 1:
        return None  # addmm with a bias that is not one value per output
    return args.get("input"), weight, _parameter(bias), patches, 1 - in_axis if transposed else in_axis, blocks


GROUPED_MM_OPS = ("_grouped_mm", "grouped_mm_fallback")  # aten's and transformers' (custom op) grouped matmul
BMM_FUNCTIONS = (torch.bmm, aten.bmm.default)
_SWAPS = ([-2, -1], [-1, -2], [1, 2], [2, 1])


def _expert_weight(node) -> tuple[str, bool] | None:
    """``(parameter name, swapped)`` of a grouped matmul's weight operand: a 3-d parameter, or it with its last
    two axes swapped (``transpose(W, -2, -1)``, ``permute(W, [0, 2, 1])``)."""
    if _parameter(node) is not None and _rank(node) == 3:
        return node.target, False
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = node.args[0]
    swapped = ((node.target in (aten.transpose.int, torch.transpose) and list(node.args[1:3]) in _SWAPS)
               or (node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1]))
    if swapped and _parameter(source) is not None and _rank(source) == 3:
        return source.target, True
    return None


def _gathered(node) -> tuple[str, fx.Node] | None:
    """``(parameter name, ids node)`` of ``W[ids]`` / ``index_select(W, 0, ids)`` of a 3-d parameter W."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = node.args[0]
    if _parameter(source) is None or _rank(source) != 3:
        return None
    if node.target is aten.index.Tensor and len(node.args[1]) == 1 and isinstance(node.args[1][0], fx.Node):
        return source.target, node.args[1][0]
    if node.target in (aten.index_select.default, torch.index_select) and node.args[1] == 0:
        return source.target, node.args[2]
    return None


def _expert_call(node: fx.Node):
    """``(input node, weight name, in_axis, route kind, route node)`` of a call that applies a 3-d expert weight
    per token (see the module docstring), else None."""
    if node.op != "call_function":
        return None
    if getattr(node.target, "_opname", None) in GROUPED_MM_OPS:
        bound = dict(zip(("input", "weight", "offs", "bias"), node.args))
        bound.update({k: node.kwargs[k] for k in ("offs", "bias") if k in node.kwargs})
        operand = _expert_weight(bound.get("weight"))
        if operand is None or bound.get("bias") is not None or not isinstance(bound.get("offs"), fx.Node) \
                or _rank(bound.get("input")) != 2:
            return None
        return bound["input"], operand[0], 2 if operand[1] else 1, "offsets", bound["offs"]
    if node.target in BMM_FUNCTIONS and len(node.args) == 2:
        a, b = node.args
        left, right = _gathered(a), _gathered(b)
        if left is not None and right is None:
            return b, left[0], 2, "ids_left", left[1]
        if right is not None and left is None:
            return a, right[0], 1, "ids_right", right[1]
    return None


def calibrated_consumers(dg) -> dict[str, Consumer]:
    """``{weight name: Consumer}`` for every consumer whose weight's input axis holds a prunable group."""
    out: dict[str, Consumer] = {}
    mixed = set()
    parameters = dict(dg.gm.named_parameters(remove_duplicate=False))
    for node in dg.gm.graph.nodes:
        call, route = _call(dg.gm, node), None
        if call is None:
            expert = _expert_call(node)
            if expert is not None:
                x, weight, in_axis, kind, source = expert
                call, route = (x, weight, None, None, in_axis, 1), (kind, source)
        if call is None or not isinstance(call[0], fx.Node):
            continue
        x, weight, bias, patches, in_axis, blocks = call
        experts = parameters[weight].shape[0] if route is not None and weight in parameters else 0
        if weight not in parameters or (bias is not None and bias not in parameters):
            continue  # a buffer or constant (a lifted tensor of an exported graph) is not refit
        try:
            groups = [g for g in dg.groups_of(weight, in_axis) if g.prunable]
        except KeyError:
            continue
        if not groups:
            continue
        shape = parameters[weight].shape
        if experts:
            features = shape[in_axis]
        else:
            features = shape[0] if in_axis == 0 else int(np.prod(shape[1:])) * blocks
        consumer = out.setdefault(weight, Consumer(weight, bias, patches, groups=groups, in_features=features,
                                                   in_axis=in_axis, blocks=blocks, experts=experts))
        if (consumer.bias, consumer.patches, consumer.in_axis, consumer.blocks, consumer.experts) != \
                (bias, patches, in_axis, blocks, experts):
            mixed.add(weight)  # one weight used in two ways: its statistics would mix two kinds of features
        consumer.calls.append((node, x))
        if route is not None:
            consumer.routes[node] = route
    return {name: c for name, c in out.items() if name not in mixed}
