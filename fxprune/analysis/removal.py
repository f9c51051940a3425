"""A removal plan checked against the groups it names, and turned into the units each atom keeps.

Every stage that reads a plan (``{group or group id: unit indices}``) goes through :func:`kept_units`:
counting it (:class:`~fxprune.analysis.shapes.PlannedShapes`), rewriting it
(:func:`fxprune.rewriting.rewrite.rewrite`), refitting for it, masking it. So a plan that would empty a group,
touch a frozen one or leave a router fewer experts than its top-k fails the same way everywhere, with a
:class:`~fxprune.errors.PlanError` naming the group.

Example::

    >>> kept = kept_units(dg, {group: [0, 2]})        # a group of 4 units
    >>> kept[group.atom]
    array([1, 3])
"""

from __future__ import annotations

import numpy as np

from fxprune.errors import PlanError


def kept_units(dg, removal: dict) -> dict[int, np.ndarray]:
    """Validate a removal plan ``{group or group id: units}`` and turn it into kept units per atom."""
    by_id = {g.id: g for g in dg.groups}
    kept = {}
    for group, units in removal.items():
        group = by_id[group] if isinstance(group, int) else group
        units = np.unique(np.asarray(list(units), dtype=np.int64))
        if units.size == 0:
            continue
        if group.frozen:
            raise PlanError(f"group G{group.id} is frozen and cannot lose units: {group.frozen[0]}")
        if units.min() < 0 or units.max() >= group.units:
            raise PlanError(f"group G{group.id} has units 0..{group.units - 1}; got {units.tolist()}")
        if units.size >= group.units:
            raise PlanError(f"group G{group.id} would lose all {group.units} units; at least one must stay")
        if group.units - units.size < group.min_kept:  # top-k over a router's experts needs k of them
            raise PlanError(f"group G{group.id} must keep at least {group.min_kept} of its {group.units} units "
                            f"({group.min_kept_reason}); the removal leaves {group.units - units.size}")
        kept[group.atom] = np.setdiff1d(np.arange(group.units), units)
    return kept
