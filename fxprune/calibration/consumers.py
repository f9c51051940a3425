"""The layers of a captured graph whose input axis (weight axis 1) holds a prunable group: Linear and 2-d
convolution consumers.

Linear: an ``nn.Linear`` module call, ``F.linear`` (``torch._C._nn.linear`` in a traced graph) or
``aten.linear`` (an exported graph). Convolution: ``nn.Conv2d`` (zero padding), ``F.conv2d`` or
``aten.conv2d``/``aten.convolution`` with ``groups=1``, not transposed; its input features are the
unfolded patches (``F.unfold``: channel-major, ``in_channels * kh * kw`` of them per output position),
so that the convolution is the Linear ``W.reshape(out, -1)`` over patches. The weight (and bias) must be
a parameter of the graph (a ``get_attr``). Several calls of one weight (a shared layer) are one consumer.

Example: in ``Linear(3, 4) -> ReLU -> Linear(4, 2)`` the second layer consumes the 4 hidden units::

    >>> [c.weight for c in calibrated_consumers(fxprune.analyze(model, (x,))).values()]
    ['2.weight']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
CONV_FUNCTIONS = (F.conv2d, torch.conv2d, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class Consumer:
    weight: str  # parameter name of the weight: (out, in) for a Linear, (out, in, kh, kw) for a convolution
    bias: str | None  # parameter name of the bias, None without one
    patches: dict | None = None  # F.unfold arguments of a convolution; None for a Linear
    calls: list = field(default_factory=list)  # (call node, its input node) for each use
    groups: list = field(default_factory=list)  # prunable groups in the weight's axis 1
    in_features: int = 0  # columns of the weight as a matrix: in_features, or in_channels * kh * kw

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input as ``(tokens, in_features)``: rows of a Linear's input, or a convolution's patches."""
        if self.patches is None:
            return x.reshape(-1, x.shape[-1])
        cols = F.unfold(x if x.ndim == 4 else x[None], **self.patches)  # (N, C * kh * kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _parameter(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _bound(node: fx.Node, names: tuple) -> dict:
    out = dict(zip(names, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def _pair(v, default):
    v = default if v is None else v
    return tuple(v) * (2 if len(tuple(v)) == 1 else 1) if isinstance(v, (tuple, list)) else (v, v)


def _unfold_args(kernel, stride, padding, dilation) -> dict | None:
    """``F.unfold`` arguments of a convolution, None for padding unfold cannot express (asymmetric "same")."""
    dilation = _pair(dilation, 1)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            return None
        padding = tuple(t // 2 for t in total)
    return {"kernel_size": tuple(kernel), "dilation": dilation, "padding": _pair(padding, 0),
            "stride": _pair(stride, 1)}


def _call(gm: fx.GraphModule, node: fx.Node):
    """``(input node, weight name, bias name, unfold arguments or None)`` of a consumer call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs.get("input")
        bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
        if isinstance(module, nn.Linear):
            return x, f"{node.target}.weight", bias, None
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
            patches = _unfold_args(module.kernel_size, module.stride, module.padding, module.dilation)
            return (x, f"{node.target}.weight", bias, patches) if patches else None
        return None
    if node.op != "call_function":
        return None
    if node.target in LINEAR_FUNCTIONS:
        args, patches = _bound(node, ("input", "weight", "bias")), None
    elif node.target in CONV_FUNCTIONS:
        args = _bound(node, _CONV_ARGS if node.target is torch.ops.aten.convolution.default else _CONV2D_ARGS)
        if args.get("transposed") or args.get("groups", 1) != 1:
            return None
        weight = args.get("weight")
        shape = getattr(weight.meta.get("val"), "shape", None) if isinstance(weight, fx.Node) else None
        if shape is None or len(shape) != 4:
            return None
        patches = _unfold_args(tuple(shape[2:]), args.get("stride"), args.get("padding"), args.get("dilation"))
        if patches is None:
            return None
    else:
        return None
    weight, bias = _parameter(args.get("weight")), args.get("bias")
    if weight is None or (bias is not None and _parameter(bias) is None):
        return None  # a computed weight or bias cannot be refit
    return args.get("input"), weight, _parameter(bias), patches


def calibrated_consumers(dg) -> dict[str, Consumer]:
    """``{weight name: Consumer}`` for every Linear or convolution whose input axis holds a prunable group."""
    out: dict[str, Consumer] = {}
    for node in dg.gm.graph.nodes:
        call = _call(dg.gm, node)
        if call is None or not isinstance(call[0], fx.Node):
            continue
        x, weight, bias, patches = call
        try:
            groups = [g for g in dg.groups_of(weight, 1) if g.prunable]
        except KeyError:
            continue
        if groups:
            features = int(np.prod(dg.gm.get_parameter(weight).shape[1:]))
            consumer = out.setdefault(weight, Consumer(weight, bias, patches, groups=groups, in_features=features))
            consumer.calls.append((node, x))
    return out
