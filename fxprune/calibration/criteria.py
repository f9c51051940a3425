"""Criteria from activation statistics: ``"activation"`` (FLAP's fluctuation) and ``"wanda"``.

Unit u of a group scores, summed over the group's calibrated consumers and the input columns j of each
consumer that belong to u (``unit_indices`` on the weight's axis 1; a convolution's column j is one input
channel at one kernel position, so a channel owns ``kh * kw`` of them, summed):

- ``Activation``: ``Var(x_j) * ||W[:, j]||_2^2`` — the output variance lost when column j is removed
  and its mean folded into the bias (FLAP, An et al., 2024);
- ``Wanda``: ``||x_j|| * ||W[:, j]||_1`` — the sum over the column of Wanda's per-weight score
  ``|W_ij| * ||x_j||`` (Sun et al., 2024), with ``||x_j||`` the root mean square over calibration tokens.

A criterion that scores a unit's columns together (``"obs"``, :mod:`fxprune.calibration.obs`) overrides
``unit_scores`` instead of ``column_scores``. Producers and norms of the group have no statistics and add
nothing. A group with no calibrated consumer (grouped or depthwise convolutions only, say) falls back to group
L2 magnitude. Every group's scores are then divided by their mean (``normalizer="mean"``), so that both kinds
are on one scale in a global ranking.

Example: hidden unit 2 of ``Linear(3, 4) -> ReLU -> Linear(4, 2)`` never varies, so it ranks lowest::

    >>> fxprune.prune(model, 0.25, example_inputs=(x,), importance="activation", calibration=[x])
"""

from __future__ import annotations

import numpy as np

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.statistics import collect_statistics
from fxprune.importance.base import Criterion
from fxprune.importance.magnitude import Magnitude
from fxprune.importance.reduce import check_normalizer, normalize
from fxprune.importance.slices import unit_indices


def unit_columns(group, member, weight) -> np.ndarray:
    """``(units, k)``: the columns of ``weight`` as a matrix ``(out, in * kh * kw)`` that each unit owns
    (a channel of a convolution owns its ``kh * kw`` kernel positions)."""
    kernel = int(np.prod(weight.shape[2:]))  # 1 for a Linear
    index = unit_indices(group, member)
    return (index[..., None] * kernel + np.arange(kernel)).reshape(group.units, -1)


class ActivationCriterion(Criterion):
    """Collects input statistics once per dependency graph, then scores units column by column."""

    gram = False  # whether the criterion reads the Gram matrix (one more statistics pass unless cached)

    def __init__(self, batches, normalizer="mean", progress=None):
        if batches is None:
            raise ValueError(f"importance {self.name!r} needs calibration batches: pass calibration=[batch, ...] "
                             f"(a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs)")
        self.batches, self.progress, self.normalizer = batches, progress, check_normalizer(normalizer)
        self.stats, self.consumers, self._prepared_for = None, None, None

    def prepare(self, dg) -> None:
        if self._prepared_for is not dg:
            self.stats = collect_statistics(dg, self.batches, gram=self.gram, progress=self.progress)
            self.consumers = calibrated_consumers(dg)
            self._prepared_for = dg

    def column_scores(self, w, stats) -> np.ndarray:
        """Per input column j of a consumer weight ``w`` (out, in features), the score of column j."""
        raise NotImplementedError

    def unit_scores(self, name: str, w, stats, columns: np.ndarray, tensors: dict) -> np.ndarray:
        """Per unit u, the score of removing columns ``columns[u]`` of consumer ``name``'s weight ``w`` (out,
        in features); the sum of its column scores unless a subclass scores the columns together."""
        return self.column_scores(w, stats)[columns].sum(1)

    def score(self, dg, group, tensors):
        self.prepare(dg)
        by_tensor = {id(tensors[name]): name for name in self.stats if name in tensors}
        total, found = np.zeros(group.units), False
        for member in group.parameters:
            t = tensors.get(member.name)
            if member.dim != 1 or t is None or id(t) not in by_tensor:
                continue
            name = by_tensor[id(t)]
            flat = t.detach().reshape(t.shape[0], -1)  # a convolution: (out, in * kh * kw)
            total += self.unit_scores(name, flat, self.stats[name], unit_columns(group, member, t), tensors)
            found = True
        if not found:
            total = Magnitude(2).score(dg, group, tensors)
        return normalize(total, self.normalizer)


class Activation(ActivationCriterion):
    name = "activation"

    def column_scores(self, w, stats):
        return (stats.var.cpu() * w.double().square().sum(0).cpu()).numpy()


class Wanda(ActivationCriterion):
    name = "wanda"

    def column_scores(self, w, stats):
        return (stats.second_moment.sqrt().cpu() * w.double().abs().sum(0).cpu()).numpy()
