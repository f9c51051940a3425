"""Relate: run each node's rule and collect axis relations in an :class:`AnalysisState`.

Graph inputs and outputs are frozen. An op without a rule freezes every axis it
touches and is listed in ``state.unsupported`` with its source line, so a
missing rule can make pruning less effective but never wrong.

After this pass ``node.meta["fxprune_rule"]`` names the rule that handled the
node (``"<none>"`` for unsupported ops).

Freezes are collected during relate and applied after solving (so refinements inherit them). What is frozen: graph
inputs and outputs (in place on a Hugging Face model, not the outputs after the first that the graph also computes
with: ``huggingface/freezes.internal_outputs``, BART's ``encoder_last_hidden_state``, passed to ``relate(gm,
free_outputs)``); spatial and kernel axes; the one unit an integer index picks (``x.select(d, i)``, ``x[:, i]``:
``rules/misc.integer_index`` splits the axis into before ++ picked(1) ++ after, freezes the picked unit and moves
the index to where it lands, so Falcon's ``grouped[..., -2, :]`` key head leaves the query heads prunable; where the
result's values are read nowhere, only its size or nothing, nothing is picked and the index is clamped into the
pruned axis, so BART's ``embed_positions(inputs_embeds[:, :, -1])`` leaves the hidden size prunable); strided
slices; stack/unbind indices; positions from ``torch.arange`` over a size read at run time; ops without a rule
(listed in the report); unrefinable relations; ``ignore``d tensors; and parameter axes that appear in no activation
(kernel, gate, vocabulary axes). A traced module with ``torch.nn.utils.parametrize`` parametrizations (weight norm)
is related as an op without a rule: its rule would see the computed ``weight``, not ``parametrizations.*`` (an
exported graph has the ops themselves). A rule that raises anything but an ``FxPruneError`` is reported as an
``FxPruneError`` naming the rule ("user rule" when registered outside fxprune), the node, its op and source line.
"""

from __future__ import annotations

import torch.fx as fx
from torch.nn.utils import parametrize

from fxprune.algebra.context import AnalysisState, RuleContext, tensor_value
from fxprune.errors import FxPruneError
from fxprune.rules import lookup


def relate(gm: fx.GraphModule, free_outputs=()) -> AnalysisState:
    """The relations of every node of ``gm``. ``free_outputs``: names of nodes whose shapes as graph outputs may
    change (a Hugging Face model pruned in place returns its encoder's states too: see
    :func:`fxprune.huggingface.freezes.internal_outputs`); every other graph output keeps its shape."""
    state = AnalysisState(gm)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        r = RuleContext(state, node, module)
        if node.op == "placeholder" or any(n.name in state.from_input for n in node.all_input_nodes):
            state.from_input.add(node.name)
        if node.op == "placeholder":
            for t in r.tensors_out():
                r.freeze(t, "graph input")
            continue
        if node.op == "output":
            for t in r.tensors_in():
                if t.key[1] not in free_outputs:
                    r.freeze(t, "graph output")
            continue
        if node.op == "get_attr":
            continue
        rule = lookup(node, module)
        if module is not None and parametrize.is_parametrized(module):
            rule = None  # its weight is computed from parametrizations.*: no module rule sees those tensors
        if rule is None:
            node.meta["fxprune_rule"] = "<none>"
            if _touches_tensors(node) or module is not None:
                r.freeze_all("no rule for this op")
                state.unsupported.append((node, r.where))
            continue
        node.meta["fxprune_rule"] = rule.__qualname__
        user = not getattr(rule, "__module__", "").startswith("fxprune.")
        if user:  # verify names it when pruning fails
            node.meta["fxprune_user_rule"] = f"{rule.__module__}.{rule.__qualname__} (for {r.where})"
        try:
            rule(r)
        except FxPruneError:
            raise
        except Exception as exc:  # a rule's own failure, named with the node it was relating
            who = f"user rule {rule.__module__}.{rule.__qualname__}" if user else f"rule {rule.__qualname__}"
            raise FxPruneError(f"{who} failed at {r.where}: {type(exc).__name__}: {exc}") from exc
        if module is not None:
            _freeze_unrelated_params(r)
    return state


def _touches_tensors(node: fx.Node) -> bool:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(tensor_value(n) is not None) or n)
    val = node.meta.get("val")
    return any(found) or tensor_value(node) is not None or (
        isinstance(val, (tuple, list)) and any(hasattr(v, "shape") for v in val))


def _freeze_unrelated_params(r: RuleContext) -> None:
    """Module tensors the rule did not mention must keep their shape (e.g. extra buffers)."""
    for t in r.module_tensors():
        for d in range(t.ndim):
            if (t.key, d) not in r.state.axis_atoms:
                r.freeze(t[d], "not covered by the module's rule")
