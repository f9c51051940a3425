"""Sparse training: regularisers that push whole units of a group towards zero before pruning.

``GroupNormRegularizer`` is DepGraph's group-level sparse training: unit k of
group g gets the gradient of ``reg / 2 * gamma_k * |w_k|^2`` added to every
parameter slice of the unit (all members of the group at once), with an
adaptive strength ``gamma_k = 2 ** (alpha * (I_max - I_k) / (I_max - I_min))``
from the unit's group L2 norm ``I_k``: the least important unit of a group is
pushed ``2 ** alpha`` times harder than the most important one, so weak units
sink to zero while strong ones are barely touched. ``update`` recomputes the
strengths (once per epoch).

``BNScaleRegularizer`` is network slimming's L1 on BatchNorm scales: ``reg *
sign(gamma)`` added to the gradient of every BatchNorm weight in a prunable group.

Both are applied after ``loss.backward()`` and before ``optimizer.step()``::

    >>> reg = GroupNormRegularizer(reg=1e-4); reg.update(dg)
    >>> loss.backward(); reg.apply(model); optimizer.step()
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.importance import named_tensors
from fxprune.importance.bn_scale import batchnorm_scales
from fxprune.importance.magnitude import Magnitude
from fxprune.importance.slices import unit_indices


def _parameters(model: torch.nn.Module) -> dict:
    return dict(model.named_parameters(remove_duplicate=False))


class GroupNormRegularizer:
    name = "group_norm"

    def __init__(self, reg: float = 1e-4, alpha: float = 4.0):
        if reg < 0 or alpha < 0:
            raise ValueError(f"reg and alpha must be >= 0, got reg={reg!r}, alpha={alpha!r}")
        self.reg, self.alpha = float(reg), float(alpha)
        self.terms: list[tuple[str, int, torch.Tensor]] = []  # (parameter, dim, per-index strength)

    def strengths(self, scores: np.ndarray) -> np.ndarray:
        """``2 ** (alpha * (max - I) / (max - min))`` of the units' group norms ``I``."""
        norms = np.sqrt(scores)
        spread = norms.max() - norms.min()
        if spread <= 0:
            return np.ones_like(norms)
        return 2.0 ** (self.alpha * (norms.max() - norms) / spread)

    def update(self, dg) -> None:
        """Recompute every unit's strength from the current weights (call once per epoch)."""
        tensors, magnitude = named_tensors(dg.gm), Magnitude(2)
        self.terms = []
        with torch.no_grad():
            for group in dg.prunable_groups:
                gamma = self.strengths(magnitude.score(dg, group, tensors))
                for member in group.parameters:
                    index = unit_indices(group, member)
                    per_index = np.zeros(member.layout.size(group.solver))
                    per_index[index.ravel()] = np.repeat(gamma, index.shape[1])
                    self.terms.append((member.name, member.dim, torch.as_tensor(per_index, dtype=torch.float32)))

    def apply(self, model: torch.nn.Module) -> None:
        """Add the regulariser's gradient to ``.grad`` of ``model``'s parameters (after ``backward``)."""
        params = _parameters(model)
        with torch.no_grad():
            for name, dim, strength in self.terms:
                p = params.get(name)
                if p is None or p.grad is None:
                    continue
                if p.shape[dim] != strength.numel():
                    raise ValueError(f"regularizer: {name} axis {dim} has {p.shape[dim]} entries but the model the "
                                     f"regulariser was built for has {strength.numel()}: after a pruning step, "
                                     f"train and regularize the pruned model (pruner.model)")
                shape = [1] * p.ndim
                shape[dim] = -1
                p.grad.add_(p * strength.to(p.device, p.dtype).view(shape), alpha=self.reg)


class BNScaleRegularizer:
    name = "bn_scale"

    def __init__(self, reg: float = 1e-4):
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.reg = float(reg)
        self.names: list[str] = []

    def update(self, dg) -> None:
        self.names = sorted({m.name for g in dg.prunable_groups for m in batchnorm_scales(dg, g)})

    def apply(self, model: torch.nn.Module) -> None:
        params = _parameters(model)
        with torch.no_grad():
            for name in self.names:
                p = params.get(name)
                if p is not None and p.grad is not None:
                    p.grad.add_(torch.sign(p), alpha=self.reg)


REGULARIZERS = {"group_norm": GroupNormRegularizer, "bn_scale": BNScaleRegularizer}


def make_regularizer(kind, reg: float = 1e-4, alpha: float = 4.0):
    """A regulariser by name (``"group_norm"``, ``"bn_scale"``), an object with update/apply, or None."""
    if kind is None or hasattr(kind, "apply"):
        return kind
    if kind == "group_norm":
        return GroupNormRegularizer(reg, alpha)
    if kind == "bn_scale":
        return BNScaleRegularizer(reg)
    raise ValueError(f"unknown regularizer {kind!r}; choose one of {sorted(REGULARIZERS)}")
