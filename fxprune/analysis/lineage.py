"""Which group of a re-analysed (already pruned) model is which group of the original.

Iterative pruning re-analyses the model after every step, and group ids are
not stable across analyses. A group is recognised by the parameter axes it
spans (``{(name, dim)}``: rewriting keeps parameter names) and, for groups
sharing the same axes (heads and head dims of one projection), by their order
in those axes, outermost first. A group that shrank to one unit drops out of
the layouts; groups with one unit are therefore left out on both sides before
matching, and a match is only accepted when the unit count is the one the
previous step left.

Example::

    >>> lineage = Lineage(dg0)                     # the original analysis
    >>> lineage.record({g: units_removed})          # after a step
    >>> origin = lineage.match(dg1)                # {new group: original group}
    >>> lineage.original_units[origin[g]]
    64
"""

from __future__ import annotations


def signature(group) -> frozenset:
    return frozenset((m.name, m.dim) for m in group.parameters)


def _position(dg, group) -> int:
    name, dim = min((m.name, m.dim) for m in group.parameters)
    groups = dg.groups_of(name, dim)
    return next(i for i, g in enumerate(groups) if g is group)


def _by_signature(dg, groups) -> dict:
    out: dict[frozenset, list] = {}
    for group in groups:
        if group.units > 1 and group.parameters:
            out.setdefault(signature(group), []).append(group)
    for same in out.values():
        same.sort(key=lambda g: _position(dg, g))
    return out


class Lineage:
    def __init__(self, dg):
        self.original = list(dg.prunable_groups)
        self.original_units = {g: g.units for g in self.original}
        self.current_units = dict(self.original_units)
        self._dg = dg
        self._current = {g: g for g in self.original}  # current group -> original group

    def origin(self, group):
        """The original group of a group of the latest analysis, or None."""
        return self._current.get(group)

    def record(self, removal: dict) -> None:
        """Units left in each original group after applying ``removal`` to the latest analysis."""
        for group, units in removal.items():
            original = self._current.get(group)
            if original is not None:
                self.current_units[original] = group.units - len(units)

    def match(self, dg) -> dict:
        """``{group of dg: original group}`` for every group that can be told apart; remembers it."""
        before = _by_signature(self._dg, list(self._current))
        after = _by_signature(dg, dg.prunable_groups)
        current = {}
        for key, new_groups in after.items():
            old_groups = [g for g in before.get(key, []) if self.current_units[self._current[g]] > 1]
            if len(old_groups) != len(new_groups):
                continue
            for old, new in zip(old_groups, new_groups):
                original = self._current[old]
                if self.current_units[original] == new.units:
                    current[new] = original
        self._dg, self._current = dg, current
        return current
