"""Interactive pruning: look at each prunable group and its unit scores, choose, then ``fxprune.apply``.

The counterpart of Torch-Pruning's ``for group in pruner.step(interactive=True)``,
with the choice left to the caller::

    >>> dg = fxprune.analyze(model, (x,))
    >>> chosen = {}
    >>> for group, scores in fxprune.groups_to_prune(dg, importance="l2"):
    ...     if "fc" in group.members[0].name:
    ...         continue                                   # leave this group alone
    ...     chosen[group] = scores.argsort()[: group.units // 4]   # its weakest quarter
    >>> pruned = fxprune.apply(dg, chosen)                 # verified; carries the plan

``scores`` has one float per unit (higher: more important), from the same
criteria ``fxprune.prune`` takes. Groups come in ``dg.prunable_groups`` order;
``group.members`` says which weights a group spans, ``group.normalized`` whether
some op normalises over it. The criterion is prepared once, so ``"taylor"`` and
``"hessian"`` run their calibration batches before the first group, and scores
are those of the model's weights at that moment.
"""

from __future__ import annotations

from fxprune.importance import iter_scores, resolve_importance


def groups_to_prune(dg, importance="l2", *, calibration=None, loss_fn=None, groups=None):
    """Yield ``(group, scores)`` for every prunable group of ``dg`` (or of ``groups``), one group at a time.

    ``importance`` is a criterion name, object or callable, as in ``fxprune.prune``;
    ``calibration`` and ``loss_fn`` are for the gradient criteria. A group the
    criterion has no opinion on (it returned ``None``) is skipped. Collect the units
    to remove as ``{group: units}`` and pass that to ``fxprune.apply(dg, ...)`` or
    ``fxprune.mask(dg, ...)``.
    """
    criterion = resolve_importance(importance, calibration, loss_fn)
    for group in groups or ():
        if not group.prunable:
            why = group.frozen[0] if group.frozen else f"{group.units} unit(s), or no parameter"
            raise ValueError(f"group G{group.id} cannot be pruned: {why}")
    yield from iter_scores(criterion, dg, dg.prunable_groups if groups is None else list(groups))
