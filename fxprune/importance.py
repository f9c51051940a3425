"""Score: importance of every unit of a group, aggregated over the group's parameter members.

The default ``"l2"`` is the paper's group magnitude: the score of unit u is the
sum, over every parameter member, of the squared entries of the slice that
removing u would delete. Buffers (running stats, ``inv_freq``) are sliced but
do not count.

Example: a group of conv1 output channels with members ``conv1.weight[0]``,
``bn1.weight[0]``, ``conv2.weight[1]`` scores unit u as
``|conv1.weight[u]|^2 + bn1.weight[u]^2 + |conv2.weight[:, u]|^2``.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.layout import decode


def unit_scores(dg, group, tensors: dict[str, torch.Tensor], power: int = 2) -> np.ndarray:
    """Per-unit magnitude of a group: sum over parameter members of |slice|^power."""
    scores = np.zeros(group.units, dtype=np.float64)
    for member in group.parameters:
        t = tensors.get(member.name)
        if t is None or t.device.type == "meta":
            continue
        other = [d for d in range(t.ndim) if d != member.dim]
        per_index = t.detach().float().abs().pow(power)
        per_index = (per_index.sum(dim=other) if other else per_index).cpu().numpy().astype(np.float64)
        for atom, coords in decode(member.layout, dg.solver):
            if atom == group.atom:
                mask = coords >= 0
                np.add.at(scores, coords[mask], per_index[mask])
    return scores


def magnitude(power: int):
    def score(dg, group, tensors):
        return unit_scores(dg, group, tensors, power)

    score.__name__ = f"l{power}"
    return score


CRITERIA = {"l2": magnitude(2), "l1": magnitude(1)}


def resolve_importance(importance):
    """A criterion by name, or a user callable ``f(dg, group, tensors) -> scores``."""
    if callable(importance):
        return importance
    if importance not in CRITERIA:
        raise ValueError(f"unknown importance {importance!r}; choose one of {sorted(CRITERIA)} or pass a callable")
    return CRITERIA[importance]


def named_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(gm.named_buffers(remove_duplicate=False))
    out.update(dict(gm.named_parameters(remove_duplicate=False)))
    return out
