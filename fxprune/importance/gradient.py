"""Gradient criteria from a calibration loss: first-order Taylor and diagonal Hessian (OBD).

``Taylor`` (Molchanov et al., 2019) estimates the loss change of removing a
unit from first order terms: unit u scores ``sum |w * g|`` over every entry
its removal deletes (``g`` the mean gradient over the calibration batches);
``multivariate=True`` scores ``|sum w * g|`` over the whole group instead (the
first order change of zeroing the unit at once).

``Hessian`` (Optimal Brain Damage, LeCun et al., 1990) uses second order
terms with the empirical Fisher as the diagonal Hessian: unit u scores
``sum 0.5 * w^2 * mean(g_b^2)`` over the calibration batches b (batches of
one sample give the per-sample Fisher).

Example::

    >>> batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    >>> fxprune.prune(model, 0.5, example_inputs=(x[:1],), importance=Taylor(batches))
    >>> # or: importance="taylor", calibration=batches, loss_fn=my_loss
"""

from __future__ import annotations

import numpy as np

from fxprune.importance.base import Criterion
from fxprune.importance.loss_gradients import calibrate
from fxprune.importance.reduce import check_normalizer, check_reduction, normalize, reduce_members
from fxprune.importance.slices import unit_sums


class GradientCriterion(Criterion):
    """Runs :func:`calibrate` once per dependency graph, then scores groups from weights and gradients."""

    def __init__(self, batches, loss_fn=None, reduction: str = "sum", normalizer=None, progress=None):
        if batches is None:
            raise ValueError(f"{type(self).__name__} importance needs calibration batches "
                             f"(e.g. calibration=[(inputs, targets)])")
        self.batches, self.loss_fn, self.progress = batches, loss_fn, progress
        self.reduction, self.normalizer = check_reduction(reduction), check_normalizer(normalizer)
        self.stats, self._prepared_for = None, None

    def prepare(self, dg) -> None:
        if self._prepared_for is not dg:
            self.stats = calibrate(dg.gm, self.batches, self.loss_fn, self.progress)
            self._prepared_for = dg

    def member_terms(self, group, member, w, stats):
        raise NotImplementedError

    def score(self, dg, group, tensors):
        self.prepare(dg)
        per_member = []
        for member in group.parameters:
            if member.name not in self.stats.mean_grad:
                continue
            per_member.append(self.member_terms(group, member, tensors[member.name], self.stats))
        if not per_member:
            return np.zeros(group.units)
        return normalize(self.combine(per_member), self.normalizer)

    def combine(self, per_member: list[np.ndarray]) -> np.ndarray:
        return reduce_members(per_member, self.reduction)


class Taylor(GradientCriterion):
    name = "taylor"

    def __init__(self, batches, loss_fn=None, multivariate: bool = False, reduction: str = "sum",
                 normalizer=None, progress=None):
        super().__init__(batches, loss_fn, reduction, normalizer, progress)
        self.multivariate = multivariate

    def member_terms(self, group, member, w, stats):
        product = w.detach().float() * stats.mean_grad[member.name]
        return unit_sums(group, member, product if self.multivariate else product.abs())

    def combine(self, per_member):
        if self.multivariate:  # signed first-order terms add up over the group before the magnitude
            return np.abs(np.sum(per_member, 0))
        return super().combine(per_member)


class Hessian(GradientCriterion):
    name = "hessian"

    def member_terms(self, group, member, w, stats):
        return unit_sums(group, member, 0.5 * w.detach().float().square() * stats.mean_sq_grad[member.name])
