"""The plan for one ratio: one entry point over the planners (local, global by count or by cost, isomorphic).

``fxprune.prune``'s ``plan`` pass, the target searches (:mod:`fxprune.planning.target`) and the iterative
``Pruner`` call :func:`make_plan` with the settings they have; it picks the planner:
:func:`~fxprune.planning.selection.local_plan` (every group loses the ratio),
:func:`~fxprune.planning.selection.global_plan` (all units ranked together),
:func:`~fxprune.planning.selection.cost_plan` (ranked by score per MAC or parameter saved) or
:func:`~fxprune.planning.isomorphic.isomorphic_plan` (ranked within each class of same-structure groups). It
sits above both modules, so that isomorphic planning, which builds on selection's planners, needs no import
back.

Example::

    >>> removal = make_plan(groups, scores, 0.3)      # local, groups of 64 units: each loses round(0.3 * 64)
    >>> {len(units) for units in removal.values()}
    {19}
"""

from __future__ import annotations

from fxprune.planning.isomorphic import isomorphic_plan
from fxprune.planning.selection import cost_plan, global_plan, local_plan
from fxprune.planning.ties import honour_ties


def make_plan(groups, scores: dict, ratio: float, *, steps: dict | None = None, global_pruning: bool = False,
              max_ratio: float = 0.9, fixed: dict | None = None, caps: dict | None = None,
              costs: dict | None = None, types: dict | None = None, classes: dict | None = None,
              normalizer="mean", ties=()) -> dict:
    """The plan for one ratio, local or global (what ``fxprune.prune`` and the target search call).

    Global with ``classes`` (``{group: isomorphic class}``): every class loses ``ratio`` of its units, ranked
    within the class (:func:`fxprune.planning.isomorphic.isomorphic_plan`; ``ratio`` may be ``{class: ratio}``);
    with ``costs``: by cost (:func:`~fxprune.planning.selection.cost_plan`, ``ratio`` is a fraction of the
    cost); else by count. ``normalizer``: how a global ranking puts each group's scores on one scale (``None``
    for scores that already are, such as ``"obs-output"``'s, in units of the model's output). ``ties``
    (:class:`~fxprune.planning.ties.CountTie`, ``dg.count_ties``): groups that must lose units in fixed proportion
    lose the tie's shared count (:func:`~fxprune.planning.ties.honour_ties`), whichever planner chose the units.
    """
    if global_pruning and classes is not None:
        plan = isomorphic_plan(groups, scores, ratio, classes, steps, max_ratio, fixed=fixed, caps=caps,
                               normalizer=normalizer)
    elif global_pruning and costs is not None:
        plan = cost_plan(groups, scores, ratio, costs, types, steps, max_ratio, normalizer, fixed=fixed, caps=caps)
    elif global_pruning:
        plan = global_plan(groups, scores, ratio, steps, max_ratio, normalizer, fixed=fixed, caps=caps)
    else:
        plan = local_plan(groups, scores, ratio, steps, fixed)
    return honour_ties(plan, ties, scores, steps) if ties else plan
