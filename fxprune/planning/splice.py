"""A model with some groups taken from a pruning of it and the rest whole: one group "pruned alone".

``prune(..., allocation="measured")`` (:mod:`fxprune.planning.measured`) measures what removing units of one group
does to the whole model's output. A one-shot refit of a group's consumers depends only on the original model's
statistics and that group's kept units, so the original with only that group's removed slices zeroed and its
consumers' refit weights written in is exactly "this group pruned and refit alone", at the original's shapes.

Each unit's entries of an axis come from the group's index map (``Member.indices``), not from a guess. That is
still checked: splicing *every* group of a pruning must give the pruning's own output error back
(:func:`fxprune.planning.measured.measured_allocation` does it and falls back with a warning if not).

Example (``pruned = prune(model, 0.5, ...)``; ``mlp`` its plan's entry for layer 0's MLP)::

    >>> alone = splice(model, pruned, [(group, mlp.kept)])
    >>> alone.encoder.layer[0].intermediate.dense.weight[mlp.removed].any()
    tensor(False)
"""

from __future__ import annotations

import copy

import torch


class SpliceError(ValueError):
    """The groups spliced do not account for a pruned tensor's shape: another group of the pruning narrowed it."""


def splice(model, pruned, parts):
    """A copy of ``model`` with the groups of ``parts`` (``(group of model's analysis, its kept units in
    pruned)`` pairs) taken from ``pruned``: their removed units' slices are zero, their kept slices and their
    modules' other parameters of unchanged shape (a refit consumer's bias) are ``pruned``'s. Each unit's slices
    of an axis are the group's own index map (``Member.indices``), so a head's rows of a fused projection are
    found wherever they lie. ``model`` may itself be a splice of the same original (a group moved within a
    pruning). An axis the pruning narrowed by more than the groups spliced is a :class:`SpliceError`."""
    out = copy.deepcopy(model)
    params, new = dict(out.named_parameters()), pruned.state_dict()
    axes: dict = {}  # parameter name: {axis: the original's entries pruned keeps there}
    for group, kept in parts:  # a group that removes nothing puts back pruned's (unchanged) slices
        for member in group.parameters:
            axes.setdefault(member.name, {})[member.dim] = torch.as_tensor(member.indices(group, kept),
                                                                           dtype=torch.long)
    with torch.no_grad():
        for name, index in axes.items():
            p, q = params[name], new[name]
            for axis in range(p.dim()):
                want = index[axis].numel() if axis in index else p.shape[axis]
                if q.shape[axis] != want:
                    raise SpliceError(f"{name}[{axis}]: the groups spliced keep {want} of its {p.shape[axis]} "
                                      f"entries, the pruning {q.shape[axis]}")
            full = q.to(p.dtype)
            for axis, idx in index.items():  # widen one axis at a time back to the original's size
                shape = list(full.shape)
                shape[axis] = p.shape[axis]
                full = full.new_zeros(shape).index_copy_(axis, idx, full)
            p.copy_(full)
            module = name.rpartition(".")[0]
            for other, o in params.items():
                if other.rpartition(".")[0] == module and other not in axes and new[other].shape == o.shape:
                    o.copy_(new[other])
    return out
