"""Plan: which units of each group to remove.

Local pruning removes ``round(ratio * units)`` units from every prunable group,
the lowest scoring first, always keeping at least one unit. With
``round_to=k`` the number of units kept is rounded to a multiple of k (never
below k, never above the group's size).

Example: a group of 64 units with ``ratio=0.3`` loses 19 units; with
``round_to=8`` it keeps 48 (45 rounded to the nearest multiple of 8).
"""

from __future__ import annotations

import numpy as np


def units_to_keep(units: int, ratio: float, round_to: int | None = None) -> int:
    keep = units - int(round(ratio * units))
    if round_to and round_to > 1 and units >= round_to:
        keep = int(round(keep / round_to)) * round_to
        keep = min(max(keep, round_to), units)
    return max(1, min(units, keep))


def local_plan(groups, scores: dict, ratio: float, round_to: int | None = None) -> dict:
    """``{group: sorted unit indices to remove}`` for every group that loses units."""
    plan = {}
    for group in groups:
        keep = units_to_keep(group.units, ratio, round_to)
        if keep >= group.units:
            continue
        order = np.argsort(scores[group], kind="stable")
        plan[group] = np.sort(order[: group.units - keep])
    return plan
