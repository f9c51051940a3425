"""Magnitude criteria: group L1/L2 (the paper's group importance) and LAMP.

``Magnitude(p=2)`` scores unit u of a group as the reduction, over the group's
parameter members, of ``sum(|slice|^p)`` — with the default ``reduction="sum"``
that is the squared L2 norm of everything removing u deletes. Buffers (running
statistics, ``inv_freq``) are sliced by pruning but carry no learnt weight, so
they do not count.

Example: conv1 (out channels) -> bn1 -> conv2 (in channels) scores channel u as
``|conv1.weight[u]|^2 + |conv1.bias[u]|^2 + bn1.weight[u]^2 + bn1.bias[u]^2 + |conv2.weight[:, u]|^2``::

    >>> fxprune.prune(model, 0.5, example_inputs=(x,), importance=Magnitude(p=1, reduction="max"))
"""

from __future__ import annotations

import numpy as np

from fxprune.importance.base import Criterion
from fxprune.importance.reduce import check_normalizer, check_reduction, normalize, reduce_members
from fxprune.importance.slices import unit_power_sums


class Magnitude(Criterion):
    def __init__(self, p: int = 2, reduction: str = "sum", normalizer=None):
        if p not in (1, 2):
            raise ValueError(f"Magnitude: p must be 1 or 2, got {p!r}")
        self.p, self.reduction = p, check_reduction(reduction)
        self.normalizer = check_normalizer(normalizer)
        self.name = f"l{p}"

    def member_score(self, group, member, tensor) -> np.ndarray:
        """Per unit of ``group``, ``sum(|slice| ** p)`` of one member's tensor (float64)."""
        return unit_power_sums(group, member, tensor, self.p)

    def member_scores(self, group, tensors: dict) -> list[np.ndarray]:
        out = []
        for member in group.parameters:
            t = tensors.get(member.name)
            if t is not None and t.device.type != "meta":
                out.append(self.member_score(group, member, t))
        return out

    def combine(self, group, per_member: list[np.ndarray]) -> np.ndarray:
        """The group's scores from its members' (in ``group.parameters`` order): reduced, then normalised.

        Separate from :meth:`score` so that :mod:`fxprune.io` can feed member scores computed one
        checkpoint tensor at a time.
        """
        if not per_member:  # meta-device weights: nothing to measure, keep the first units
            return np.zeros(group.units)
        return normalize(reduce_members(per_member, self.reduction), self.normalizer)

    def score(self, dg, group, tensors):
        return self.combine(group, self.member_scores(group, tensors))


class LAMP(Magnitude):
    """LAMP (Lee et al., ICLR 2021) at group level: group L2 magnitude with the LAMP normalisation.

    Unit u scores ``s_u / sum(s_v for v not ranked below u)``, which makes the
    scores of groups of different sizes comparable in a global ranking.
    """

    def __init__(self, p: int = 2, reduction: str = "sum"):
        super().__init__(p, reduction, normalizer="lamp")
        self.name = "lamp"


def unit_scores(dg, group, tensors: dict, power: int = 2) -> np.ndarray:
    """Group magnitude: the sum over parameter members of ``|slice|^power`` (kept for existing callers)."""
    return Magnitude(power).score(dg, group, tensors)
