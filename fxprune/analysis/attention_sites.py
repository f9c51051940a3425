"""Attention modules found in the captured graph, with their head counts: whatever the projections are called.

An attention module is the module that calls ``scaled_dot_product_attention`` (or softmax between two matmuls,
for eager attention): the innermost entry of that node's ``nn_module_stack``, in an exported graph (aten ops) or
a symbolically traced one (torch functions and tensor methods, named as the aten ops they compute). Its query, key and
value operands are ``(batch, heads, sequence, head_dim)``, so the head counts and head dim are read from their
shapes, before pruning from the analysed graph and after pruning from the rewritten one. This finds fused
projections under any name (GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj``) without a list of names.

Example::

    >>> sites = attention_sites(dg.gm)            # GPT-NeoX, 4 heads of 16
    >>> sites["gpt_neox.layers.0.attention"]
    Site(heads=4, kv_heads=4, head_dim=16)
    >>> update_head_counts(model, sites, attention_sites(pruned))   # 3 heads left: num_key_value_heads ... = 3
"""

from __future__ import annotations

from typing import NamedTuple

import operator

import torch
import torch.nn as nn


class Site(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int


_MATMULS = ("aten::matmul", "aten::bmm", "aten::einsum")
# between the score matmul and the softmax: scaling, masks, biases (one tensor operand each)
_BETWEEN = ("aten::mul", "aten::div", "aten::add", "aten::sub", "aten::masked_fill", "aten::where", "aten::to",
            "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::expand", "aten::view", "aten::reshape",
            "aten::tanh", "aten::maximum", "aten::minimum", "aten::max", "aten::min", "aten::clamp", "aten::clamp_min")
# (Gemma 2's soft-capping: tanh(scores / cap) * cap; XGLM's floor at the dtype's minimum: maximum(scores, min))


def _torch_names() -> dict:
    """The torch functions a symbolically traced graph calls, by the aten name of what they compute."""
    F = torch.nn.functional
    names = {F.scaled_dot_product_attention: "scaled_dot_product_attention", torch.matmul: "matmul",
             operator.matmul: "matmul", torch.bmm: "bmm", torch.einsum: "einsum", F.softmax: "softmax",
             torch.softmax: "softmax", operator.mul: "mul", torch.mul: "mul", operator.truediv: "div",
             torch.div: "div", operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
             torch.where: "where", torch.masked_fill: "masked_fill", torch.reshape: "reshape",
             torch.transpose: "transpose", torch.permute: "permute", torch.flatten: "flatten",
             torch.unsqueeze: "unsqueeze"}
    return {fn: f"aten::{name}" for fn, name in names.items()}


_TORCH_NAMES = _torch_names()


def _schema_name(node) -> str:
    """The aten name of what a node computes: an aten op's schema name (an exported graph), or the name of the
    torch function or tensor method a symbolically traced graph calls (``x.softmax(-1)``: ``aten::softmax``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.name
    if node.op == "call_method":
        return f"aten::{node.target}"
    if node.op == "call_function":
        try:
            return _TORCH_NAMES.get(node.target, "")
        except TypeError:  # an unhashable target
            return ""
    return ""


def _shape(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _operands(node):
    """The query and key nodes of an attention call: SDPA's first two operands, or the score matmul's."""
    name = _schema_name(node)
    if "scaled_dot_product" in name:
        return node.args[0], node.args[1]
    if name not in ("aten::_softmax", "aten::softmax"):
        return None
    current = node.args[0]
    for _ in range(8):  # walk back from the softmax to the score matmul
        if not isinstance(current, torch.fx.Node) or current.op not in ("call_function", "call_method"):
            return None
        name = _schema_name(current)
        if name in _MATMULS and name != "aten::einsum":
            return current.args[0], current.args[1]
        if name not in _BETWEEN and not _keeps_shape(current):
            return None
        current = next((a for a in current.args if isinstance(a, torch.fx.Node) and _shape(a) is not None
                        and len(_shape(a)) >= 3), None)
    return None


def _keeps_shape(node) -> bool:
    """A call the tracer kept whole (a leaf function: timm's ``maybe_add_mask(scores, mask)`` with
    ``TIMM_FUSED_ATTN=0``) whose output has the shape of its first tensor operand: a mask or bias added to the
    scores, walked through like ``aten::add``."""
    if node.op != "call_function" or _schema_name(node):
        return False
    first = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    return first is not None and _shape(first) is not None and _shape(first) == _shape(node)


_SHAPE_ONLY = ("aten::view", "aten::_unsafe_view", "aten::reshape", "aten::clone", "aten::contiguous",
               "aten::unsqueeze", "aten::slice", "aten::alias", "aten::transpose", "aten::permute", "aten::_to_copy",
               "aten::flatten")


# rotary embeddings applied after the broadcast (Falcon: k * cos + rotate_half(k) * sin), followed by the key
_ELEMENTWISE = ("aten::add", "aten::mul", "aten::sub", "aten::to")


def _kv_heads(key) -> int:
    """Heads of the key before ``repeat_kv``: transformers expands (b, kv, 1, s, d) to (b, kv, rep, s, d) and
    folds it into (b, kv * rep, s, d) before SDPA, which then sees as many key heads as query heads. Falcon
    broadcasts (b, s, kv, 1, d) to (b, s, kv, rep, d) the same way: the kv count is the axis just outside the
    one expanded from 1."""
    current = key
    for _ in range(12):
        if not isinstance(current, torch.fx.Node) or current.op not in ("call_function", "call_method"):
            break
        name = _schema_name(current)
        if name in ("aten::expand", "aten::broadcast_to"):
            inner, outer = _shape(current.args[0]), _shape(current)
            if inner is not None and outer is not None and len(inner) == len(outer) == 5:
                grown = [i for i in range(1, 5) if inner[i] == 1 != outer[i]]
                if len(grown) == 1:
                    return int(inner[grown[0] - 1])
            break
        if name not in _SHAPE_ONLY and not (name in _ELEMENTWISE and _shape(current.args[0]) == _shape(current)):
            break
        current = current.args[0]
    return int(_shape(key)[-3])


def _unfolded(node):
    """``node`` if it is (batch, heads, seq, dim)-shaped; for a (batch x heads, seq, dim) operand, the 4-d value it
    was reshaped from (walking back through views and transposes), when its first two sizes make the folded
    batch; else None."""
    shape = _shape(node)
    if shape is None or len(shape) >= 4:
        return node if shape is not None else None
    if len(shape) != 3:
        return None
    current = node
    for _ in range(6):
        if not isinstance(current, torch.fx.Node) or current.op not in ("call_function", "call_method") or \
                _schema_name(current) not in _SHAPE_ONLY or not current.args:
            return None
        current = current.args[0]
        found = _shape(current)
        if found is None:
            return None
        if len(found) == 4:
            return current if found[0] * found[1] == shape[0] else None
    return None


def attention_sites(gm) -> dict[str, Site]:
    """``{module path: Site}`` of every attention call in ``gm`` whose operands are (batch, heads, seq, dim).

    Key operands of eager attention come transposed, (batch, heads, dim, seq): the head count is their
    third-last size either way. Operands that fold the heads into the batch, (batch x heads, seq, dim) for a
    ``bmm`` (XGLM, BART), are read where they were still (batch, heads, seq, dim) (:func:`_unfolded`).
    """
    sites = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        operands = _operands(node)
        stack = node.meta.get("nn_module_stack")
        if operands is None or not stack:
            continue
        operands = [_unfolded(o) for o in operands]
        if None in operands:
            continue
        q, k = (_shape(o) for o in operands)
        try:
            site = Site(int(q[-3]), _kv_heads(operands[1]), int(q[-1]))
        except (TypeError, ValueError):  # a symbolic head count: not a per-head layout
            continue
        path = list(stack.values())[-1][0]
        sites.setdefault(path, site)
    return sites


def update_head_counts(model: nn.Module, before: dict, after: dict) -> None:
    """Head-count attributes of every attention module, from the head counts of the rewritten graph.

    An integer attribute named as a count of heads (``num_heads``, ``num_key_value_heads``, ``n_head`` ...,
    not ``head_dim`` / ``head_size``) that equals the old count takes the new one; ``*groups*`` equal to
    the old heads per kv head take the new ratio. Shapes (widths) are not touched here: they follow the tensors.
    """
    for path, old in before.items():
        new = after.get(path)
        if new is None or new == old:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for attr, value in list(vars(module).items()):
            if type(value) is not int:
                continue
            name = attr.lower()
            if "head" in name and "dim" not in name and "size" not in name:
                kv = "kv" in name or "key_value" in name
                if kv and value == old.kv_heads:
                    setattr(module, attr, new.kv_heads)
                elif not kv and value == old.heads:
                    setattr(module, attr, new.heads)
            elif "group" in name and old.kv_heads and value == old.heads // old.kv_heads and new.kv_heads:
                setattr(module, attr, new.heads // new.kv_heads)
