"""The slices of each unit of a group in one member tensor, as a ``(units, k)`` matrix.

Every criterion starts here. A member axis may hold the group whole (conv
output channels), as a factor (heads in ``q_proj.weight[0] = heads x head_dim``)
or twice (RoPE pairs): :func:`fxprune.algebra.layout.decode` gives each flat index's
coordinate on the group's atom, and every unit owns the same number of flat
indices, so the slices line up as rows.

Example: ``fc.weight`` of shape (10, 32) whose axis 1 is ``channels(8) x spatial(4)``
gives, for the channel group, an (8, 40) matrix: row c holds ``fc.weight[:, 4c:4c+4]``.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.algebra.layout import decode


def unit_indices(group, member) -> np.ndarray:
    """``(units, k)`` flat indices of ``member``'s axis: row u lists the indices unit u owns."""
    flat, owner = [], []
    for atom, coords in decode(member.layout, group.solver):
        if atom == group.atom:
            hit = np.nonzero(coords >= 0)[0]
            flat.append(hit)
            owner.append(coords[hit])
    if not flat:
        return np.zeros((group.units, 0), dtype=np.int64)
    flat, owner = np.concatenate(flat), np.concatenate(owner)
    order = np.argsort(owner, kind="stable")
    if flat.size % group.units:
        raise ValueError(f"{member.name}[{member.dim}]: {flat.size} indices do not split evenly into "
                         f"{group.units} units of group G{group.id}")
    return flat[order].reshape(group.units, -1)


def unit_matrix(group, member, tensor: torch.Tensor) -> torch.Tensor:
    """Row u: every entry of ``tensor`` that removing unit u deletes (float32, detached)."""
    index = unit_indices(group, member)
    picked = tensor.detach().index_select(member.dim, torch.as_tensor(index.ravel(), device=tensor.device))
    return picked.movedim(member.dim, 0).reshape(group.units, -1).float()


def unit_sums(group, member, tensor: torch.Tensor) -> np.ndarray:
    """Per unit, the sum of ``tensor``'s entries that removing the unit deletes (float64).

    Cheaper than ``unit_matrix(...).sum(1)``: the other axes are summed first, in one pass.
    """
    other = [d for d in range(tensor.ndim) if d != member.dim]
    along = tensor.detach().sum(dim=other, dtype=torch.float64) if other else tensor.detach().double()
    return _per_unit(group, member, along)


def unit_power_sums(group, member, tensor: torch.Tensor, p: int) -> np.ndarray:
    """Per unit, ``sum(|x| ** p)`` over the entries of ``tensor`` that removing the unit deletes (float64).

    Same as ``unit_sums(group, member, tensor.abs() ** p)`` without the full-size temporary;
    the per-index sums are float32 (relative error ~1e-6, far below any ranking gap),
    which is 3-25x faster than float64 on a 1B-parameter model.
    """
    t = tensor.detach()
    other = [d for d in range(t.ndim) if d != member.dim]
    if not other:
        along = t.double().abs() ** p
    elif t.ndim - 1 in other and t.is_contiguous():  # reducing the contiguous axis: one fused pass
        along = torch.linalg.vector_norm(t.float(), ord=p, dim=other).double() ** p
    else:  # vector_norm over strided axes is slow; an elementwise pass then a sum is not
        along = (t.abs() if p == 1 else t.square()).sum(dim=other, dtype=torch.float32).double()
    return _per_unit(group, member, along)


def _per_unit(group, member, along: torch.Tensor) -> np.ndarray:
    """Per-index sums along the member's axis, gathered and added up per unit."""
    return along.cpu().numpy()[unit_indices(group, member)].sum(1)


def parameter_slices(group, tensors: dict) -> dict[str, torch.Tensor]:
    """``{"name[dim]": (units, k) matrix}`` for every parameter member with real (non-meta) data."""
    out = {}
    for member in group.parameters:
        t = tensors.get(member.name)
        if t is None or t.device.type == "meta":
            continue
        out[f"{member.name}[{member.dim}]"] = unit_matrix(group, member, t)
    return out
