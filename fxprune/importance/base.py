"""The criterion protocol: ``criterion(dg, group, tensors) -> scores`` (one float per unit, or None).

A criterion object is called once per prunable group with the dependency
graph, the group and the graph's tensors by name. It returns an array of
``group.units`` scores (lower = pruned first), or ``None`` to leave the group
alone (e.g. BN scale on a group with no BatchNorm). Criteria that need a
forward/backward pass over data do it once per dependency graph, in
:meth:`Criterion.prepare`, which the scoring pass calls first.

User callables are adapted by :func:`fxprune.importance.resolve_importance`:
``f(group, weights)`` gets ``weights = {"name[dim]": (units, k) slice matrix}``;
the older ``f(dg, group, tensors)`` form is called as it is.

Example::

    >>> class Smallest(Criterion):
    ...     def score(self, dg, group, tensors):
    ...         return -np.arange(group.units)        # prune the last units first
"""

from __future__ import annotations

import numpy as np


class Criterion:
    """Base class: subclasses implement :meth:`score`; :meth:`prepare` is optional."""

    name = "criterion"

    def prepare(self, dg) -> None:
        """Work done once per dependency graph before any group is scored (calibration)."""

    def score(self, dg, group, tensors: dict):
        raise NotImplementedError

    def __call__(self, dg, group, tensors: dict):
        return self.score(dg, group, tensors)

    def __repr__(self) -> str:
        return self.name


def as_scores(values, group, who: str) -> np.ndarray | None:
    """Check a criterion's result: ``group.units`` finite floats (or None)."""
    if values is None:
        return None
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.shape != (group.units,):
        raise ValueError(f"importance {who} returned {scores.size} scores for group G{group.id}, "
                         f"which has {group.units} units")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"importance {who} returned non-finite scores for group G{group.id}")
    return scores
