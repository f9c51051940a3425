"""Per-module and per-group ratios: ``ratios={"layer4": 0.7, model.fc: 0.0, group: 0.2}`` -> ``{group: ratio}``.

Keys are module names, module objects of the model, parameter names, groups or
group ids. A module covers the groups it *produces*: those in the outputs of the
ops that run inside it (and that have a parameter inside it) — its output
channels, hidden units and heads, as in Torch-Pruning's ``pruning_ratio_dict``.
``"layer4"`` therefore covers layer4's inner channels and its residual stream,
but not the layer3 channels it reads. A parameter name covers every group of
that parameter. A group covered by several keys takes the *smallest* of their
ratios. To keep a module's inputs and outputs whole, use ``ignore``.

Example::

    >>> group_ratios(dg, {"layer4": 0.7, "layer4.2": 0.2})
    {Group(#40, units=512, ...): 0.7, ..., Group(#52, units=2048, ...): 0.2}

``ratios`` and ``ignore`` find module objects by identity in the caller's model (``capture.module_names``,
``capture.name_of_key``): an export capture holds copies under the same names.
"""

from __future__ import annotations

import torch

from fxprune.analysis.capture import module_names, name_of_key
from fxprune.analysis.depgraph import Group


def check_ratio(value, what: str = "ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def group_ratios(dg, ratios: dict | None) -> dict:
    """``{group: ratio}`` for the prunable groups the keys of ``ratios`` cover."""
    if not ratios:
        return {}
    by_id = {g.id: g for g in dg.groups}
    names = module_names(dg.gm, getattr(dg, "model", None))
    out: dict[Group, float] = {}
    for key, value in ratios.items():
        ratio = check_ratio(value, f"ratios[{_describe(key)}]")
        for group in _groups_of_key(dg, key, by_id, names):
            out[group] = min(ratio, out.get(group, ratio))
    return out


def _groups_of_key(dg, key, by_id: dict, module_names: dict) -> list:
    if isinstance(key, Group):
        return [key] if key.prunable else []
    if isinstance(key, int) and not isinstance(key, bool):
        if key not in by_id:
            raise ValueError(f"ratios: no group with id {key}")
        return [by_id[key]] if by_id[key].prunable else []
    prefix = name_of_key(key, module_names, "ratios",
                         "ratios keys are module names, modules, groups or group ids; got ")
    inside = [g for g in dg.groups if any(_within(m.name, prefix) for m in g.parameters)]
    if not inside:
        raise ValueError(f"ratios: no parameter named {prefix!r} (or inside a module of that name)")
    if prefix in dict(dg.gm.named_modules()):
        produced = _produced_groups(dg, prefix)
        inside = [g for g in inside if g in produced]
    return [g for g in inside if g.prunable]


def _produced_groups(dg, prefix: str) -> set:
    """Groups in the outputs of the ops that run inside module ``prefix``."""
    owners = {n.name: _owner(n) for n in dg.gm.graph.nodes}
    out = set()
    for (key, _dim), layout in dg.layouts.items():
        if key[0] == "v" and _within(owners.get(key[1], ""), prefix):
            out.update(dg.groups_of_layout(layout))
    return out


def _owner(node) -> str:
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def _within(name, prefix: str) -> bool:
    return isinstance(name, str) and (prefix == "" or name == prefix or name.startswith(prefix + "."))


def _describe(key) -> str:
    if isinstance(key, torch.nn.Module):
        return type(key).__name__
    if isinstance(key, Group):
        return f"G{key.id}"
    return repr(key)
