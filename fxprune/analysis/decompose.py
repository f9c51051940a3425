"""Decompose modules that cannot hold pruned shapes into their functional graph; recompose them after rewriting.

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
``"weights"``, else None). After rewriting, :func:`recompose` reads it to put
each call back as one module call over the sliced parameters: an
``nn.MultiheadAttention`` when the pruned widths still fit it, else a
:class:`~fxprune.modules.PrunedMultiheadAttention` (a subclass with its own
query/inner/output widths and scale), so the pruned model keeps the fused path.

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

from fxprune.modules.attention import PrunedMultiheadAttention, merge_masks
from fxprune.rules.registry import register


def _mha_signature(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                   average_attn_weights=True, is_causal=False):
    pass


@register(merge_masks)
def merge_masks_rule(r) -> None:
    r.freeze_all("attention mask (sequence axes)")


DECOMPOSED = "fxprune_decomposed"  # node.meta key: which module call a node was decomposed from (see above)
# the classes recompose puts back; a user's own subclass (its forward may differ) stays decomposed
_RECOMPOSABLE = (nn.MultiheadAttention, PrunedMultiheadAttention)


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
    call = {"module": name, "index": index, "config": _config(m),
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


def _config(m: nn.MultiheadAttention) -> dict:
    return {"class": type(m), "embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim,
            "kdim": m.kdim, "vdim": m.vdim, "dropout": m.dropout, "batch_first": m.batch_first,
            "bias": m.in_proj_bias is not None, "scale": getattr(m, "scale", None)}


# -- recompose: after rewriting, one module call again ---------------------

def recompose(gm: fx.GraphModule) -> bool:
    """Put every decomposed call back as one (resized) module call where it can be; True if the graph changed.

    Run on the rewritten graph: parameters are sliced and the ``unflatten`` head
    shapes rewritten, so the pruned widths are read from them. A call stays
    decomposed (still correct, only not fused) when no module holds its widths:
    q/k and v head dims pruned apart, or a user's own MultiheadAttention subclass.
    """
    calls: dict[tuple, tuple[dict, list]] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get(DECOMPOSED)
        if tag is not None:
            call = tag["call"]
            calls.setdefault((call["module"], call["index"]), (call, []))[1].append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    built: dict[str, nn.Module] = {}  # a module called more than once is rebuilt once
    changed = False
    for call, nodes in calls.values():
        changed |= _recompose_call(gm, call, sorted(nodes, key=order.__getitem__), built)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _recompose_call(gm: fx.GraphModule, call: dict, nodes: list, built: dict) -> bool:
    roles = {n.meta[DECOMPOSED]["role"]: n for n in nodes if n.meta[DECOMPOSED]["role"]}
    if call["config"]["class"] not in _RECOMPOSABLE or not {"q_heads", "k_heads", "v_heads", "out"} <= set(roles):
        return False
    shapes = [roles[r].args[2] for r in ("q_heads", "k_heads", "v_heads")]
    if not all(isinstance(s, (tuple, list)) and len(s) == 2 and all(type(i) is int for i in s) for s in shapes):
        return False
    if len(set(map(tuple, shapes))) != 1:
        # head dims pruned to different sizes for q/k and for v (only when the caller prunes head dims): no
        # MultiheadAttention has two head dims, so this call keeps the functional form: correct, only not fused
        return False
    members, outputs = set(nodes), {roles["out"], roles.get("weights")}
    if any(u not in members for n in nodes if n not in outputs for u in n.users):
        return False  # something else reads an intermediate result (never made by decompose itself)
    name = call["module"]
    module = built.get(name) or _resized_module(gm.get_submodule(name), call["config"], *shapes[0])
    if module is None:
        return False
    if name not in built:
        owner, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, module)
        built[name] = module
    g = gm.graph
    env = {n.name: n for n in g.nodes}
    a = {k: env[v] if isinstance(v, str) else v for k, v in call["arguments"].items()}
    weights = roles.get("weights")
    need_weights = weights is not None and bool(weights.users)  # unused weights: the fast path still runs
    kwargs = {"key_padding_mask": a["key_padding_mask"], "need_weights": need_weights, "attn_mask": a["attn_mask"]}
    if need_weights and not a["average_attn_weights"]:
        kwargs["average_attn_weights"] = False
    if a["is_causal"]:
        kwargs["is_causal"] = True
    with g.inserting_after(nodes[-1]):
        fused = g.call_module(name, (a["query"], a["key"], a["value"]), kwargs)
    if roles["out"].meta.get("stack_trace"):
        fused.meta["stack_trace"] = roles["out"].meta["stack_trace"]
    results = [(roles["out"], 0)] + ([(weights, 1)] if need_weights else [])
    for old, i in reversed(results):
        with g.inserting_after(fused):
            old.replace_all_uses_with(g.call_function(operator.getitem, (fused, i)),
                                      delete_user_cb=lambda user: user not in members)
    for n in reversed(nodes):
        g.erase_node(n)
    return True


def _resized_module(m: nn.MultiheadAttention, config: dict, heads: int, head_dim: int) -> nn.Module | None:
    """``nn.MultiheadAttention`` if the pruned widths fit it, else a PrunedMultiheadAttention; same parameters."""
    inner = heads * head_dim
    packed = m.in_proj_weight is not None
    projections = [m.in_proj_weight] if packed else [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    widths = [projections[0].shape[1]] * 3 if packed else [w.shape[1] for w in projections]
    rows = [w.shape[0] for w in projections]
    bias = m.in_proj_bias is not None
    if rows != ([3 * inner] if packed else [inner] * 3) or m.out_proj.weight.shape[1] != inner or \
            (m.out_proj.bias is not None) != bias:
        return None
    out_dim = m.out_proj.weight.shape[0]
    default_scale = config["scale"] is None and head_dim == config["head_dim"]
    scale = config["scale"] if config["scale"] is not None else 1.0 / math.sqrt(config["head_dim"])
    eq, ek, ev = widths
    kw = {"dropout": config["dropout"], "bias": bias, "batch_first": config["batch_first"], "device": "meta",
          "dtype": projections[0].dtype}
    if eq == out_dim == inner and default_scale and packed == (ek == ev == eq):
        new = nn.MultiheadAttention(inner, heads, kdim=ek, vdim=ev, **kw)
    else:
        new = PrunedMultiheadAttention(eq, heads, head_dim, out_dim, kdim=ek, vdim=ev, packed_in_proj=packed,
                                       scale=None if default_scale else scale, **kw)
    for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
        if getattr(new, attr) is not None:
            setattr(new, attr, getattr(m, attr))
    new.out_proj.weight = m.out_proj.weight
    if bias:
        new.out_proj.bias = m.out_proj.bias
    new.train(m.training)
    return new
