"""Plan: which units of each group to remove, from per-unit scores (lowest first).

*Local* pruning removes the same fraction of every prunable group:
``round(ratio * units)`` units. *Global* pruning ranks the units of all groups
together on normalised scores (each group's scores divided by their mean by
default, so a group of 2048 small-norm channels and one of 64 large-norm
channels compete fairly) and removes ``round(ratio * total units)`` of them,
never more than ``max_ratio`` of one group. In both, a group's *step* (from
:mod:`fxprune.planning.alignment`) rounds the number of units it loses to the
nearest multiple of the step, and at least one unit always stays. ``fixed`` gives
some groups their own ratio (from ``ratios={...}``); they are planned locally.

Example: a group of 64 units with ``ratio=0.3`` loses 19 units; with a step of 8
it keeps 48 (loses 16, the multiple of 8 nearest to 19)::

    >>> units_to_keep(64, 0.3), units_to_keep(64, 0.3, step=8)
    (45, 48)

*By cost* (global pruning towards a MACs or parameter target, :func:`cost_plan`): units
are ranked by normalised score per unit of cost, the MACs (parameters) removing one saves
(:mod:`fxprune.planning.costs`), and ``ratio`` is the fraction of the ranked groups' total
cost to remove. Scores are normalised per group *type* (all heads together, all MLP units
together: each type's scores divided by their pooled mean), so a layer whose units are
weak keeps fewer of them than a strong layer of the same type, and heads compete with
MLP units on one scale. Example: two groups of 32 units with the same scores, one whose
unit costs 288 MACs (it feeds a 256-wide input) and one 36; to remove 40% of the MACs
(3738 of 9344) the count ranking removes 12 units of each (24 units), the cost ranking 13
units of the costly group alone (``tests/test_plan_costs.py``)::

    >>> costs = {wide: 288.0, narrow: 36.0}
    >>> found = search_ratio(dg, lambda r: cost_plan(groups, scores, r, costs), "macs", 0.6)
    >>> [g.units - len(found.removal.get(g, [])) for g in (wide, narrow)]
    [19, 32]

In ``cost_plan`` units go in whole steps, least normalised score per unit of cost first, up to ``max_ratio`` of a
group; a chunk that would overshoot the budget is skipped so cheaper ones can still fill it. A plain ratio with
``global_pruning=True`` stays by count. With ``isomorphic=True`` (``fxprune.planning.isomorphic``) each class of
groups is ranked by ``global_plan`` on its own.
"""

from __future__ import annotations

import math

import numpy as np

from fxprune.importance.reduce import check_normalizer, normalize


def round_keep(units: int, keep: int, step: int | None = 1) -> int:
    """``keep`` moved to the nearest count whose removed units are a multiple of ``step``; at least 1 kept.

    ``step`` comes from :func:`fxprune.planning.alignment.removal_steps`: a group whose
    weights are 4096 channels wide under an alignment of 8 has step 8, so 2867 becomes 2864.
    """
    keep = max(1, min(units, int(keep)))
    if step and step > 1:
        most = (units - 1) // step * step  # at least one unit stays
        removed = min(max(math.ceil((units - keep) / step - 0.5) * step, 0), most)  # a tie keeps more
        keep = units - removed
    return keep


def units_to_keep(units: int, ratio: float, step: int | None = 1) -> int:
    return round_keep(units, units - int(round(ratio * units)), step)


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` lowest scores (ties: lower index first)."""
    return np.sort(np.argsort(scores, kind="stable")[:count])


def local_plan(groups, scores: dict, ratio: float, steps: dict | None = None, fixed: dict | None = None) -> dict:
    """``{group: sorted unit indices to remove}`` for every group that loses units.

    Groups missing from ``scores`` (the criterion had no opinion) are left whole;
    ``steps`` (``{group: step}``) rounds each group's removal to a multiple of its step.
    """
    fixed, steps = fixed or {}, steps or {}
    plan = {}
    for group in groups:
        if group not in scores:
            continue
        keep = units_to_keep(group.units, fixed.get(group, ratio), steps.get(group, 1))
        if keep < group.units:
            plan[group] = lowest(scores[group], group.units - keep)
    return plan


def global_plan(groups, scores: dict, ratio: float, steps: dict | None = None, max_ratio: float = 0.9,
                normalizer="mean", fixed: dict | None = None, caps: dict | None = None) -> dict:
    """Remove ``ratio`` of all units of the non-fixed groups, lowest normalised scores first.

    A group never loses more than ``max_ratio`` of its units (nor all of them); ``caps``
    (``{group: most units it may lose}``) overrides that per group.
    """
    check_normalizer(normalizer)
    fixed, steps = fixed or {}, steps or {}
    plan = local_plan([g for g in groups if g in fixed], scores, 0.0, steps, fixed)
    ranked = [g for g in groups if g in scores and g not in fixed]
    if not ranked:
        return plan
    budget = int(round(ratio * sum(g.units for g in ranked)))
    cap = {g: min(g.units - 1, int(np.floor(max_ratio * g.units + 1e-9))) for g in ranked}
    cap.update({g: min(g.units - 1, c) for g, c in (caps or {}).items() if g in cap})
    normalised = [normalize(scores[g], normalizer) for g in ranked]
    values = np.concatenate(normalised)
    owner = np.concatenate([np.full(g.units, i) for i, g in enumerate(ranked)])
    # a unit may go if fewer than cap[g] units of its group score lower: then take the lowest `budget` of those
    rank_in_group = np.concatenate([np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in normalised])
    eligible = np.nonzero(rank_in_group < np.array([cap[g] for g in ranked])[owner])[0]
    chosen = eligible[np.argsort(values[eligible], kind="stable")[:max(budget, 0)]]
    taken = np.bincount(owner[chosen], minlength=len(ranked))
    for group, count in zip(ranked, taken):
        keep = round_keep(group.units, group.units - int(count), steps.get(group, 1))
        if keep < group.units:
            plan[group] = lowest(scores[group], group.units - keep)
    return plan


def cost_plan(groups, scores: dict, ratio: float, costs: dict, types: dict | None = None, steps: dict | None = None,
              max_ratio: float = 0.9, normalizer="mean", fixed: dict | None = None, caps: dict | None = None) -> dict:
    """Remove ``ratio`` of the ranked groups' total cost, least normalised score per unit of cost first.

    ``costs`` (``{group: cost of one unit}``, :func:`fxprune.planning.costs.unit_costs`) and
    ``types`` (``{group: type}``, :func:`fxprune.planning.costs.group_types`; missing: one type
    per group) come from the caller. A group removes whole steps: its lowest-scoring units in
    chunks of its step, each chunk ranked by its summed normalised score over its cost (a
    group's chunks rank in order, since its units are taken lowest first); chunks are taken in
    that order while the budget lasts, skipping one that would overshoot it. A group loses
    at most ``max_ratio`` of its units (``caps`` overrides, as in :func:`global_plan`), never
    all; groups that cost nothing are left whole (removing them does not reach the target).
    ``fixed`` groups are planned locally, as in :func:`global_plan`.
    """
    check_normalizer(normalizer)
    fixed, steps, types = fixed or {}, steps or {}, types or {}
    plan = local_plan([g for g in groups if g in fixed], scores, 0.0, steps, fixed)
    ranked = [g for g in groups if g in scores and g not in fixed and costs.get(g, 0) > 0]
    if not ranked:
        return plan
    normalised = _normalise_per_type(ranked, scores, types, normalizer)
    cap = {g: min(g.units - 1, int(np.floor(max_ratio * g.units + 1e-9))) for g in ranked}
    cap.update({g: min(g.units - 1, c) for g, c in (caps or {}).items() if g in cap})
    values, weights, owners = [], [], []
    for i, group in enumerate(ranked):
        step = max(1, steps.get(group, 1))
        chunks = cap[group] // step
        if chunks <= 0:
            continue
        ordered = np.sort(normalised[group])[:chunks * step].reshape(chunks, step)
        values.append(ordered.sum(1) / (step * costs[group]))
        weights.append(np.full(chunks, step * costs[group]))
        owners.append(np.full(chunks, i))
    if not values:
        return plan
    values, weights, owners = map(np.concatenate, (values, weights, owners))
    order = np.argsort(values, kind="stable")
    budget = ratio * sum(g.units * costs[g] for g in ranked) * (1 + 1e-12)
    taken = _fill(order, weights, budget)
    for i, chunks in enumerate(np.bincount(owners[taken], minlength=len(ranked))):
        if chunks:
            group = ranked[i]
            plan[group] = lowest(scores[group], int(chunks) * max(1, steps.get(group, 1)))
    return plan


def _fill(order: np.ndarray, weights: np.ndarray, budget: float) -> np.ndarray:
    """The chunks taken in ``order`` while the budget lasts; one that does not fit is skipped, cheaper ones after
    it may still fit (coarse chunks, a residual stream's 8 channels, would otherwise stop the plan short).

    A group's chunks weigh the same and come in order, so a skipped chunk's later siblings are skipped too.
    """
    spent = np.cumsum(weights[order])
    head = int(np.searchsorted(spent, budget, side="right"))
    taken, left = list(order[:head]), budget - (spent[head - 1] if head else 0.0)
    smallest = weights.min()
    for chunk in order[head:]:
        if left < smallest:  # nothing fits any more (a 7B model has ~10^5 chunks)
            break
        if weights[chunk] <= left:
            taken.append(chunk)
            left -= weights[chunk]
    return np.asarray(taken, dtype=np.int64)


def _normalise_per_type(ranked, scores: dict, types: dict, normalizer) -> dict:
    """``{group: scores}`` normalised over the pooled scores of each group's type (a missing type: its own)."""
    by_type: dict = {}
    for group in ranked:
        by_type.setdefault(types.get(group, ("group", group.id)), []).append(group)
    out = {}
    for members in by_type.values():
        pooled = normalize(np.concatenate([np.asarray(scores[g], dtype=np.float64) for g in members]), normalizer)
        for group, part in zip(members, np.split(pooled, np.cumsum([g.units for g in members])[:-1])):
            out[group] = part
    return out
