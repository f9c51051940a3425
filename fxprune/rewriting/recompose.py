"""Recompose: after rewriting, each decomposed module call becomes one (resized) module call again.

:mod:`fxprune.analysis.decompose` turned every ``nn.MultiheadAttention`` call into functional ops and tagged
each node it made with ``node.meta["fxprune_decomposed"]`` (the module, which call, its arguments and
configuration, the node's role). Rewriting has since sliced the parameters and rewritten the ``unflatten``
head shapes, so the pruned widths are read from the graph: the call is put back as an ``nn.MultiheadAttention``
when the pruned widths still fit it, else as a :class:`~fxprune.modules.PrunedMultiheadAttention` (its own
query/inner/output widths and scale), so the pruned model keeps the fused kernels. A call stays decomposed
(correct, only not fused) when no module holds its widths.

Example: a ViT's ``attn`` (12 heads of 64, width 768) that lost 3 heads, its residual width kept, comes back as
``PrunedMultiheadAttention(768, 9, 64, 768)`` (q/k/v 768 -> 576, out 576 -> 768); had the residual width been
pruned to 576 as well, as ``nn.MultiheadAttention(576, 9)``.

Which module: query width = out width = heads x head_dim with the head dim unchanged (so the default scale) and the
packing unchanged gives a resized ``nn.MultiheadAttention`` (same ``batch_first``, bias, dropout, ``kdim``/``vdim``,
train/eval mode); heads pruned apart from the residual width, or head dims pruned equally for q/k and v, give a
``PrunedMultiheadAttention`` (its own ``head_dim``, ``out_dim`` and ``scale``: the original ``1/sqrt(head_dim)``
when head dims shrank); q/k and v head dims pruned to different sizes (only when the caller prunes head dims) leave
the call decomposed. Both classes reuse the rewritten ``Parameter`` objects, so unchanged names and ties survive;
attention weights the caller never reads are not asked for (``need_weights=False``), which keeps the fast path. A
decomposed attention is a chain of separate ops instead of one fused kernel; its cost on a GPU has not been measured
with a committed result.
"""

from __future__ import annotations

import math
import operator

import torch.fx as fx
import torch.nn as nn

from fxprune.dotted import set_attribute
from fxprune.analysis.decompose import DECOMPOSED
from fxprune.modules.attention import PrunedMultiheadAttention

# the classes recompose puts back; a user's own subclass (its forward may differ) stays decomposed
_RECOMPOSABLE = (nn.MultiheadAttention, PrunedMultiheadAttention)


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
    module = built.get(name) or resized_module(gm.get_submodule(name), call["config"], *shapes[0])
    if module is None:
        return False
    if name not in built:
        set_attribute(gm, name, module)
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


def resized_module(m: nn.MultiheadAttention, config: dict, heads: int, head_dim: int) -> nn.Module | None:
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
