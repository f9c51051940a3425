"""BN scale (network slimming, Liu et al. 2017): a channel's importance is ``|gamma|`` of its BatchNorm.

A group that passes through several BatchNorms (a residual stream) sums their
``|gamma|``; a group with no BatchNorm returns ``None`` and is not pruned by
this criterion, as in network slimming.

Example::

    >>> fxprune.prune(model, 0.5, example_inputs=(x,), importance="bn_scale")
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from fxprune.importance.base import Criterion
from fxprune.importance.slices import unit_sums


def batchnorm_scales(dg, group) -> list:
    """Parameter members of ``group`` that are the ``weight`` (gamma) of an affine BatchNorm."""
    out = []
    for member in group.parameters:
        owner, _, attr = member.name.rpartition(".")
        try:
            module = dg.gm.get_submodule(owner)
        except AttributeError:
            continue
        if attr == "weight" and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            out.append(member)
    return out


class BNScale(Criterion):
    name = "bn_scale"

    def score(self, dg, group, tensors):
        members = [m for m in batchnorm_scales(dg, group) if tensors[m.name].device.type != "meta"]
        if not members:
            return None
        return np.sum([unit_sums(group, m, tensors[m.name].detach().abs()) for m in members], 0)
