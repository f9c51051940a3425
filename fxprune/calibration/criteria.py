"""Criteria from activation statistics: ``"activation"`` (FLAP's fluctuation) and ``"wanda"``; the base class
of ``"obs"`` (:mod:`fxprune.calibration.obs`).

Unit u of a group scores, summed over the group's calibrated consumers and the input columns j of each
consumer's matrix ``M`` (see :mod:`fxprune.calibration.consumers`: ``W``, ``W.T`` for ``x @ W``/addmm, or
``W.reshape(out, -1)`` for a convolution) that belong to u (``unit_indices`` on the weight's input axis; a
convolution's column j is one input channel at one kernel position, so a channel owns ``prod(kernel)`` of
them, summed; a grouped convolution's channel rank c owns column c of every block, each scored with its
block's rows and its own input feature):

- ``Activation``: ``Var(x_j) * ||W[:, j]||_2^2`` — the output variance lost when column j is removed
  and its mean folded into the bias (FLAP, An et al., 2024);
- ``Wanda``: ``||x_j|| * ||W[:, j]||_1`` — the sum over the column of Wanda's per-weight score
  ``|W_ij| * ||x_j||`` (Sun et al., 2024), with ``||x_j||`` the root mean square over calibration tokens.

A mixture-of-experts weight (``Consumer.experts``: one unit is one column of every expert's matrix) is scored
per expert on the statistics of the tokens routed to that expert, and the experts' scores are added weighted
by each expert's share of the routed tokens (``ExpertStats.shares``: the expected loss per routed token; the
router's gate values, which scale each expert's output, are left out). An expert no token picked adds nothing.

A criterion that scores a unit's columns together (``"obs"``) overrides ``unit_scores`` instead of
``column_scores``. Producers and norms of the group have no statistics and add nothing. A group with no
calibrated consumer (depthwise convolutions only, say) falls back to group L2 magnitude, with one warning
per dependency graph naming such groups. A router's experts axis (whole experts) is scored from the expert
weights' statistics too: expert e scores all its columns' scores, weighted by its share of the routed tokens
(``expert_scores``). Every group's scores are then
divided by their mean (``normalizer="mean"``), so that both kinds are on one scale in a global ranking.

Example: hidden unit 2 of ``Linear(3, 4) -> ReLU -> Linear(4, 2)`` never varies, so it ranks lowest::

    >>> fxprune.prune(model, 0.25, example_inputs=(x,), importance="activation", calibration=[x])
"""

from __future__ import annotations

import warnings

import numpy as np

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.statistics import collect_statistics
from fxprune.importance import register_criterion
from fxprune.importance.base import Criterion
from fxprune.importance.magnitude import Magnitude
from fxprune.importance.reduce import check_normalizer, normalize
from fxprune.importance.slices import unit_indices


def unit_columns(consumer, index: np.ndarray) -> np.ndarray:
    """``(units, k)``: the columns of an ungrouped consumer's matrix (see ``Consumer.matrices``) that each unit
    owns, from ``index`` (``unit_indices`` on the weight's input axis): a convolution's channel owns its
    ``prod(kernel)`` kernel positions, a Linear's input feature its one column.

    Example: channels 0 and 2 of a 3x3 convolution own columns 0-8 and 18-26::

        >>> unit_columns(conv_consumer, np.array([[0], [2]]))[:, [0, -1]]
        array([[ 0,  8],
               [18, 26]])
    """
    kernel = consumer.kernel
    return (index[..., None] * kernel + np.arange(kernel)).reshape(len(index), -1)


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

    def input_scores(self, consumer, w, stats) -> np.ndarray:
        """Per index of the weight tensor ``w``'s input axis, its columns' scores summed (kernel positions,
        and the blocks of a grouped convolution; experts weighted by their share of the tokens)."""
        total = np.zeros(w.shape[consumer.in_axis])
        if consumer.experts:
            for matrix, s, share in zip(consumer.matrices(w.detach()), stats.experts, stats.shares):
                if s.count:
                    total += share * self.column_scores(matrix, s)
            return total
        for b, matrix in enumerate(consumer.matrices(w.detach())):
            d = matrix.shape[1]
            total += self.column_scores(matrix, stats.features(slice(b * d, (b + 1) * d))).reshape(
                -1, consumer.kernel).sum(1)
        return total

    def unit_scores(self, consumer, w, stats, index: np.ndarray, tensors: dict) -> np.ndarray:
        """Per unit u, the score of removing the input indices ``index[u]`` (on the weight's input axis) of
        ``consumer``'s weight ``w``: the sum of their columns' scores unless a subclass scores them together."""
        return self.input_scores(consumer, w, stats)[index].sum(1)

    def expert_scores(self, consumer, w, stats) -> np.ndarray:
        """Per expert of an expert weight ``w``, the score of removing the whole expert: all its columns' scores
        (what it adds to the output on its tokens), weighted by its share of the routed tokens."""
        return np.array([share * self.column_scores(matrix, s).sum() if s.count else 0.0
                         for matrix, s, share in zip(consumer.matrices(w.detach()), stats.experts, stats.shares)])

    def score(self, dg, group, tensors):
        self.prepare(dg)
        by_tensor = {id(tensors[name]): (self.consumers[name], s) for name, s in self.stats.items()
                     if name in tensors and name in self.consumers}
        parts = [None] * len(group.parameters)
        for i, member in enumerate(group.parameters):
            t = tensors.get(member.name)
            if t is None or id(t) not in by_tensor:
                continue
            consumer, stats = by_tensor[id(t)]
            if member.dim == consumer.in_axis:
                parts[i] = self.unit_scores(consumer, t, stats, unit_indices(group, member), tensors)
            elif consumer.experts and member.dim == 0:  # whole experts: a router's experts axis
                parts[i] = self.expert_scores(consumer, t, stats)[unit_indices(group, member)].sum(1)

        def fallback():
            self._warn_fallback(dg, group)
            return Magnitude(2).score(dg, group, tensors)

        return self.combine(group, parts, fallback)

    def combine(self, group, parts: list, fallback) -> np.ndarray:
        """The group's scores from its members' parts (``unit_scores`` of the consumer a member is the input axis
        of; None for other members), summed in member order and normalised; ``fallback()`` (L2 magnitude) when
        no member is a calibrated consumer's input. The layer-by-layer checkpoint pass
        (:mod:`fxprune.io.checkpoint.layerwise`) fills ``parts`` one decoder layer at a time and combines them here.

        Example::

            >>> criterion.combine(group, [np.array([1.0, 3.0]), None], lambda: None)    # divided by the mean
            array([0.5, 1.5])
        """
        total, found = np.zeros(group.units), False
        for part in parts:
            if part is not None:
                total += part
                found = True
        if not found:
            total = fallback()
        return normalize(total, self.normalizer)

    def _warn_fallback(self, dg, group) -> None:
        """Say, once per dependency graph, which groups no calibrated consumer reads (scored by L2 magnitude)."""
        if getattr(self, "_warned_for", None) is dg:
            return
        self._warned_for = dg
        covered = {id(g) for c in self.consumers.values() if c.weight in self.stats for g in c.groups}
        covered |= {id(g) for g in dg.prunable_groups for c in self.consumers.values()
                    if c.experts and c.weight in self.stats and any(m.name == c.weight and m.dim == 0
                                                                   for m in g.parameters)}
        missing = [g for g in dg.prunable_groups if id(g) not in covered] or [group]
        shown = "; ".join(f"G{g.id} ({', '.join(f'{m.name}[{m.dim}]' for m in g.parameters[:3])})"
                          for g in missing[:3])
        warnings.warn(f"fxprune: importance {self.name!r}: {len(missing)} prunable group(s) have no calibrated "
                      f"consumer (depthwise or transposed convolutions, batched matmuls of activations, computed "
                      f"weights) and are scored by L2 weight magnitude instead: {shown}"
                      f"{' ...' if len(missing) > 3 else ''}", stacklevel=4)


@register_criterion("activation")
class Activation(ActivationCriterion):
    name = "activation"

    def column_scores(self, w, stats):
        return (stats.var.cpu() * w.double().square().sum(0).cpu()).numpy()


@register_criterion("wanda")
class Wanda(ActivationCriterion):
    name = "wanda"

    def column_scores(self, w, stats):
        return (stats.second_moment.sqrt().cpu() * w.double().abs().sum(0).cpu()).numpy()
