"""FPGM (He et al., CVPR 2019): prune the units nearest the geometric median, the most replaceable ones.

For each parameter member, unit u's slice is a vector; its score there is the
sum of Euclidean distances to every other unit's slice. A unit close to all
the others (near the geometric median) scores low. Member scores are combined
with ``reduction`` (default ``"sum"``).

Example: three units whose slices are (0, 0), (1, 0) and (10, 0) have distance
sums 11, 10 and 19: unit 1 is the most central and is pruned first.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.importance.base import Criterion
from fxprune.importance.reduce import check_normalizer, check_reduction, normalize, reduce_members
from fxprune.importance.slices import parameter_slices


class FPGM(Criterion):
    name = "fpgm"

    def __init__(self, reduction: str = "sum", normalizer=None):
        self.reduction, self.normalizer = check_reduction(reduction), check_normalizer(normalizer)

    def score(self, dg, group, tensors):
        per_member = [torch.cdist(m.double()[None], m.double()[None])[0].sum(1).numpy()
                      for m in parameter_slices(group, tensors).values()]
        if not per_member:
            return np.zeros(group.units)
        return normalize(reduce_members(per_member, self.reduction), self.normalizer)
