"""Decompose modules that cannot hold pruned shapes into their functional graph (recomposed after rewriting).

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

Every node made here carries ``node.meta["fxprune_decomposed"]`` =
``{"call": {"module", "index", "arguments", "config"}, "role": ...}``: the
module's qualified name, which of its calls, the call's arguments (graph nodes
by name), the module's configuration, and the node's role
(``"q_heads"``/``"k_heads"``/``"v_heads"`` for the unflatten nodes, ``"out"``,
``"weights"``, else None). After rewriting, :func:`fxprune.rewriting.recompose.recompose`
reads it to put each call back as one module call over the sliced parameters: an
``nn.MultiheadAttention`` when the pruned widths still fit it, else a
:class:`~fxprune.modules.PrunedMultiheadAttention` (a subclass with its own
query/inner/output widths and scale), so the pruned model keeps the fused path.

A configuration it does not cover (``bias_k``, ``add_zero_attn``, per-head 3-d
masks, unbatched input) is left as the module, whose rule freezes its axes.

Covered: batched 3-d inputs, a 2-d ``attn_mask``, ``key_padding_mask``, ``need_weights`` both ways, ``batch_first``
both ways, ``kdim``/``vdim``. The graph is re-propagated after decomposing.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.modules.attention import merge_masks
from fxprune.rules.registry import register


def _mha_signature(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                   average_attn_weights=True, is_causal=False):
    pass


@register(merge_masks)
def merge_masks_rule(r) -> None:
    r.freeze_all("attention mask (sequence axes)")


DECOMPOSED = "fxprune_decomposed"  # node.meta key: which module call a node was decomposed from (see above)


def decompose(gm: fx.GraphModule) -> bool:
    """Decompose every MultiheadAttention call that can be; True if the graph changed."""
    modules = dict(gm.named_modules())
    changed = False
    calls: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.MultiheadAttention):
            index = calls.get(node.target, 0)
            if _decompose_mha(gm, node, modules[node.target], index):
                calls[node.target] = index + 1
                changed = True
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


def _decompose_mha(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention, index: int) -> bool:
    a = inspect.signature(_mha_signature).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = dict(a.arguments)
    arguments = {k: v.name if isinstance(v, fx.Node) else v for k, v in a.items()}  # recompose passes them all
    for key in ("attn_mask", "key_padding_mask"):  # a forward's mask argument left at its default None
        mask = a[key]
        if isinstance(mask, fx.Node) and mask.meta.get("val") is None and (mask.op == "placeholder"
                                                                           or "val" in mask.meta):
            a[key] = None
    if not _decomposable(node, m, a):
        return False
    g, name = gm.graph, node.target
    heads, head_dim = m.num_heads, m.head_dim
    inner = heads * head_dim  # embed_dim for nn.MultiheadAttention; its own width for PrunedMultiheadAttention
    scale = getattr(m, "scale", None)
    roles: dict[fx.Node, str] = {}
    existing = set(g.nodes)
    with g.inserting_before(node):
        if m._qkv_same_embed_dim:
            packed = g.call_function(torch.split, (g.get_attr(f"{name}.in_proj_weight"), [inner] * 3))
            weights = [g.call_function(operator.getitem, (packed, i)) for i in range(3)]
        else:
            weights = [g.get_attr(f"{name}.{p}_proj_weight") for p in "qkv"]
        biases = [None] * 3
        if m.in_proj_bias is not None:
            packed_b = g.call_function(torch.split, (g.get_attr(f"{name}.in_proj_bias"), [inner] * 3))
            biases = [g.call_function(operator.getitem, (packed_b, i)) for i in range(3)]
        heads_first = []
        for role, x, w, b in zip(("q_heads", "k_heads", "v_heads"), (a["query"], a["key"], a["value"]), weights,
                                 biases):
            if not m.batch_first:
                x = g.call_method("transpose", (x, 0, 1))
            y = g.call_function(F.linear, (x, w, b))
            y = g.call_method("unflatten", (y, -1, (heads, head_dim)))
            roles[y] = role
            heads_first.append(g.call_method("transpose", (y, 1, 2)))
        q, k, v = heads_first
        mask = None
        if a["attn_mask"] is not None or a["key_padding_mask"] is not None:
            mask = g.call_function(merge_masks, (a["attn_mask"], a["key_padding_mask"], torch.float32))
        p = m.dropout if m.training else 0.0
        scale_value = 1.0 / math.sqrt(head_dim) if scale is None else scale
        attn_weights = None
        if a["need_weights"]:
            scores = g.call_function(torch.matmul, (g.call_function(operator.mul, (q, scale_value)),
                                                    g.call_method("transpose", (k, -2, -1))))
            if mask is not None:
                scores = g.call_function(operator.add, (scores, mask))
            probs = g.call_function(F.softmax, (scores,), {"dim": -1})
            if p:
                probs = g.call_function(F.dropout, (probs,), {"p": p, "training": True})
            out = g.call_function(torch.matmul, (probs, v))
            attn_weights = g.call_method("mean", (probs, 1)) if a["average_attn_weights"] else probs
            roles[attn_weights] = "weights"
        else:
            out = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                                  {"attn_mask": mask, "dropout_p": p, "scale": scale_value})
        out = g.call_method("flatten", (g.call_method("transpose", (out, 1, 2)), -2))
        out = g.call_function(F.linear, (out, g.get_attr(f"{name}.out_proj.weight"),
                                         g.get_attr(f"{name}.out_proj.bias") if m.out_proj.bias is not None else None))
        if not m.batch_first:
            out = g.call_method("transpose", (out, 0, 1))
        roles[out] = "out"
    call = {"module": name, "index": index, "config": mha_config(m),
            "arguments": arguments}
    for new in g.nodes:
        if new not in existing:
            new.meta[DECOMPOSED] = {"call": call, "role": roles.get(new)}
            if node.meta.get("stack_trace"):
                new.meta["stack_trace"] = node.meta["stack_trace"]
    for user in list(node.users):
        replacement = out if user.args[1] == 0 else attn_weights
        if replacement is not None:
            user.replace_all_uses_with(replacement)
        g.erase_node(user)
    g.erase_node(node)
    return True


def mha_config(m: nn.MultiheadAttention) -> dict:
    """What recompose needs to rebuild ``m`` at other widths (its class, widths, dropout, layout, scale)."""
    return {"class": type(m), "embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim,
            "kdim": m.kdim, "vdim": m.vdim, "dropout": m.dropout, "batch_first": m.batch_first,
            "bias": m.in_proj_bias is not None, "scale": getattr(m, "scale", None)}
