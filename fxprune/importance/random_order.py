"""Random importance: a baseline that every real criterion should beat.

Scores are uniform in [0, 1), reproducible from ``seed`` and the group's id.

Example::

    >>> fxprune.prune(model, 0.5, example_inputs=(x,), importance=Random(seed=3))
"""

from __future__ import annotations

import numpy as np

from fxprune.importance.base import Criterion


class Random(Criterion):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, dg, group, tensors):
        return np.random.default_rng([self.seed, group.id]).random(group.units)
