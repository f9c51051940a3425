"""Per-module and per-group ratios: ``ratios={"layer4": 0.7, model.fc: 0.0, group: 0.2}`` -> ``{group: ratio}``.

Keys are module names or parameter names (a prefix: ``"layer4"`` covers
``layer4.0.conv1.weight``), module objects of the model, groups, or group ids.
A name or module applies to every prunable group with a parameter inside it;
a group covered by several keys takes the *smallest* of their ratios, so a
module listed with 0.0 never changes shape. Note that a group spans every
layer that shares its channels: ``"layer4"`` also covers the channels layer4
reads from layer3, and ``model.fc: 0.0`` keeps the residual stream that feeds
fc whole.

Example::

    >>> group_ratios(dg, {"layer4": 0.7, model.fc: 0.0})
    {Group(#40, units=512, ...): 0.7, ..., Group(#52, units=2048, ...): 0.0}
"""

from __future__ import annotations

import torch

from fxprune.depgraph import Group


def check_ratio(value, what: str = "ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def group_ratios(dg, ratios: dict | None) -> dict:
    """``{group: ratio}`` for the prunable groups the keys of ``ratios`` cover."""
    if not ratios:
        return {}
    by_id = {g.id: g for g in dg.groups}
    module_names = {id(m): name for name, m in dg.gm.named_modules()}
    out: dict[Group, float] = {}
    for key, value in ratios.items():
        ratio = check_ratio(value, f"ratios[{_describe(key)}]")
        for group in _groups_of_key(dg, key, by_id, module_names):
            out[group] = min(ratio, out.get(group, ratio))
    return out


def _groups_of_key(dg, key, by_id: dict, module_names: dict) -> list:
    if isinstance(key, Group):
        return [key] if key.prunable else []
    if isinstance(key, int) and not isinstance(key, bool):
        if key not in by_id:
            raise ValueError(f"ratios: no group with id {key}")
        return [by_id[key]] if by_id[key].prunable else []
    if isinstance(key, torch.nn.Module):
        if id(key) not in module_names:
            raise ValueError(f"ratios: module {type(key).__name__} is not part of the model")
        prefix = module_names[id(key)]
    elif isinstance(key, str):
        prefix = key
    else:
        raise TypeError(f"ratios keys are module names, modules, groups or group ids; got {type(key).__name__}")
    inside = [g for g in dg.groups if any(_within(m.name, prefix) for m in g.parameters)]
    if not inside:
        raise ValueError(f"ratios: no parameter named {prefix!r} (or inside a module of that name)")
    return [g for g in inside if g.prunable]


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _describe(key) -> str:
    if isinstance(key, torch.nn.Module):
        return type(key).__name__
    if isinstance(key, Group):
        return f"G{key.id}"
    return repr(key)
