"""Decompose: rewrite modules that cannot hold pruned shapes as their functional graph.

``nn.MultiheadAttention`` has one ``embed_dim`` for the hidden size *and* for
heads x head_dim, so it cannot express a pruned head count on its own. Each call
becomes ``linear -> unflatten(H, D) -> sdpa -> flatten -> linear`` over the
module's own parameters (``get_attr`` nodes with the original names), and the
axis algebra then finds heads and head dims with no ``num_heads`` argument.

Example: ``x, _ = self.attn(x, x, x, need_weights=False)`` in a ViT becomes::

    in_proj_weight = self.attn.in_proj_weight
    split = torch.split(in_proj_weight, [768, 768, 768])
    q = F.linear(x, split[0], ...).unflatten(-1, (12, 64)).transpose(1, 2)
    ...
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=None, scale=0.125)
    out = F.linear(attn.transpose(1, 2).flatten(-2), self.attn.out_proj.weight, ...)

A configuration it does not cover (``bias_k``, ``add_zero_attn``, per-head 3-d
masks, unbatched input) is left as the module, whose rule freezes its axes.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import register


def _mha_signature(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                   average_attn_weights=True, is_causal=False):
    pass


def merge_masks(attn_mask, key_padding_mask, dtype: torch.dtype):
    """One additive float mask of shape (B or 1, 1, L or 1, S) from MHA's two optional masks."""
    merged = None
    for mask, view in ((attn_mask, lambda m: m.reshape(1, 1, *m.shape[-2:])),
                       (key_padding_mask, lambda m: m.reshape(m.shape[0], 1, 1, m.shape[-1]))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        mask = view(mask.to(dtype))
        merged = mask if merged is None else merged + mask
    return merged


@register(merge_masks)
def merge_masks_rule(r) -> None:
    r.freeze_all("attention mask (sequence axes)")


def decompose(gm: fx.GraphModule) -> bool:
    """Decompose every MultiheadAttention call that can be; True if the graph changed."""
    modules = dict(gm.named_modules())
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.MultiheadAttention):
            changed |= _decompose_mha(gm, node, modules[node.target])
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _decomposable(node: fx.Node, m: nn.MultiheadAttention, a: dict) -> bool:
    if m.bias_k is not None or m.add_zero_attn:
        return False
    if any(isinstance(a[k], fx.Node) for k in ("need_weights", "average_attn_weights", "is_causal")):
        return False
    query = a["query"].meta.get("val") if isinstance(a["query"], fx.Node) else None
    mask = a["attn_mask"].meta.get("val") if isinstance(a["attn_mask"], fx.Node) else None
    if query is None or query.ndim != 3 or (mask is not None and mask.ndim != 2):
        return False
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return False
        if user.args[1] == 1 and user.users and not a["need_weights"]:
            return False  # the caller uses the None weights; leave the module as it is
    return True


def _decompose_mha(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> bool:
    a = inspect.signature(_mha_signature).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = dict(a.arguments)
    if not _decomposable(node, m, a):
        return False
    g, name = gm.graph, node.target
    heads, embed = m.num_heads, m.embed_dim
    head_dim = embed // heads
    with g.inserting_before(node):
        if m._qkv_same_embed_dim:
            packed = g.call_function(torch.split, (g.get_attr(f"{name}.in_proj_weight"), [embed] * 3))
            weights = [g.call_function(operator.getitem, (packed, i)) for i in range(3)]
        else:
            weights = [g.get_attr(f"{name}.{p}_proj_weight") for p in "qkv"]
        biases = [None] * 3
        if m.in_proj_bias is not None:
            packed_b = g.call_function(torch.split, (g.get_attr(f"{name}.in_proj_bias"), [embed] * 3))
            biases = [g.call_function(operator.getitem, (packed_b, i)) for i in range(3)]
        heads_first = []
        for x, w, b in zip((a["query"], a["key"], a["value"]), weights, biases):
            if not m.batch_first:
                x = g.call_method("transpose", (x, 0, 1))
            y = g.call_function(F.linear, (x, w, b))
            y = g.call_method("unflatten", (y, -1, (heads, head_dim)))
            heads_first.append(g.call_method("transpose", (y, 1, 2)))
        q, k, v = heads_first
        mask = None
        if a["attn_mask"] is not None or a["key_padding_mask"] is not None:
            mask = g.call_function(merge_masks, (a["attn_mask"], a["key_padding_mask"], torch.float32))
        p = m.dropout if m.training else 0.0
        scale = 1.0 / math.sqrt(head_dim)
        attn_weights = None
        if a["need_weights"]:
            scores = g.call_function(torch.matmul, (g.call_function(operator.mul, (q, scale)),
                                                    g.call_method("transpose", (k, -2, -1))))
            if mask is not None:
                scores = g.call_function(operator.add, (scores, mask))
            probs = g.call_function(F.softmax, (scores,), {"dim": -1})
            if p:
                probs = g.call_function(F.dropout, (probs,), {"p": p, "training": True})
            out = g.call_function(torch.matmul, (probs, v))
            attn_weights = g.call_method("mean", (probs, 1)) if a["average_attn_weights"] else probs
        else:
            out = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                                  {"attn_mask": mask, "dropout_p": p, "scale": scale})
        out = g.call_method("flatten", (g.call_method("transpose", (out, 1, 2)), -2))
        out = g.call_function(F.linear, (out, g.get_attr(f"{name}.out_proj.weight"),
                                         g.get_attr(f"{name}.out_proj.bias") if m.out_proj.bias is not None else None))
        if not m.batch_first:
            out = g.call_method("transpose", (out, 0, 1))
    for user in list(node.users):
        replacement = out if user.args[1] == 0 else attn_weights
        if replacement is not None:
            user.replace_all_uses_with(replacement)
        g.erase_node(user)
    g.erase_node(node)
    return True
