"""Targets instead of ratios: find the ratio whose plan keeps a given fraction of the MACs or parameters.

MACs and parameters are monotone (up to rounding) in the ratio, so a bisection
finds it. Each probe plans with the ratio and counts the plan with
:func:`fxprune.analysis.macs.estimate`, which reads the new sizes off the solved
layouts: no tensor is sliced and no graph is rewritten until the best plan is
chosen. The pruned model is then counted for real (``Job.achieved``). With global pruning
by cost (:func:`fxprune.planning.selection.cost_plan`) the searched ratio is the fraction of
the first-order cost removed; the exact count still decides.

Example::

    >>> plan, ratio, kept = search_ratio(dg, lambda r: make_plan(groups, scores, r), "macs", 0.5)
    >>> abs(kept - 0.5) < 0.02
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.analysis.macs import estimate
from fxprune.planning.costs import unit_costs

METRICS = ("macs", "params")


@dataclass
class SearchResult:
    removal: dict
    ratio: float
    kept: float  # estimated fraction of the metric kept by ``removal``
    probes: int


def search_ratio(dg, plan_for, metric: str, fraction: float, *, upper: float = 0.999, tolerance: float = 0.002,
                 max_probes: int = 40) -> SearchResult:
    """The plan (from ``plan_for(ratio)``) whose ``metric`` is closest to ``fraction`` of the unpruned one."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    index = METRICS.index(metric)
    base = estimate(dg, {})[index]
    if base == 0:
        raise ValueError(f"the model has no {metric} to reduce (counted 0)")

    def kept(ratio: float) -> tuple[float, dict]:
        removal = plan_for(ratio)
        return estimate(dg, removal)[index] / base, removal

    best = SearchResult({}, 0.0, 1.0, 0)
    low, high = 0.0, upper
    above, below = {}, None  # the plans bracketing the target: keeps more / less than `fraction`
    for probe in range(1, max_probes + 1):
        ratio = high if probe == 1 else (low + high) / 2
        value, removal = kept(ratio)
        if abs(value - fraction) < abs(best.kept - fraction):
            best = SearchResult(removal, ratio, value, probe)
        if probe == 1 and value > fraction:  # even the largest ratio keeps too much
            break
        if abs(value - fraction) <= tolerance * fraction:
            break
        if value > fraction:
            low, above = ratio, removal
        else:
            high, below = ratio, removal
    best.probes = probe
    if below is not None and abs(best.kept - fraction) > tolerance * fraction:
        best = _between(dg, above, below, index, base, fraction, best)
    return best


def _between(dg, above: dict, below: dict, index: int, base: float, fraction: float, best: SearchResult):
    """Walk from the plan above the target to the one below it, one group at a time, keeping the closest.

    Coarse groups (whole heads, aligned channel steps) make the uniform ratio jump over the
    target; moving groups one by one gives every intermediate plan.
    """
    plan = dict(above)
    for group in sorted(set(above) | set(below), key=lambda g: g.id):
        if group in below:
            plan[group] = below[group]
        else:
            plan.pop(group, None)
        value = estimate(dg, plan)[index] / base
        if abs(value - fraction) < abs(best.kept - fraction):
            best = SearchResult(dict(plan), best.ratio, value, best.probes)
        if value <= fraction:
            break
    return best


def search_by_cost(dg, groups, plan_for, metric: str, fraction: float, steps: dict | None = None,
                   rounds: int = 2) -> SearchResult:
    """The ratio search for global pruning by cost: ``plan_for(ratio, costs)`` plans with ``{group: unit cost}``.

    The first round costs each unit in the whole model (:func:`fxprune.planning.costs.unit_costs`);
    each further round re-costs the units at the plan the last round found (a conv whose input
    and output groups both shrink is worth less per unit than in the whole model) and searches
    again. A round's plan replaces the last one's only when it lands at least as close to ``fraction``
    or within the search tolerance.

    Example (the groups of a ResNet, costs re-measured at the half-MACs plan)::

        >>> found = search_by_cost(dg, groups, lambda r, c: cost_plan(groups, scores, r, c), "macs", 0.5)
        >>> abs(found.kept - 0.5) <= 0.01
        True
    """
    best, at = None, None
    for _ in range(max(1, rounds)):
        costs = unit_costs(dg, groups, metric, steps, at=at)
        found = search_ratio(dg, lambda ratio: plan_for(ratio, costs), metric, fraction)
        if best is None or abs(found.kept - fraction) <= max(abs(best.kept - fraction), 0.002 * fraction):
            best = found
        if not found.removal:
            break
        at = found.removal
    return best
