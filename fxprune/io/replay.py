"""Replay a saved pruning plan on a fresh copy of the original model.

This is how a pruned architecture ships: prune once, keep the plan (a small
JSON file), then re-apply it to the original model after fine-tuning it, or to
another checkpoint of the same architecture. The same units are removed, so
replaying a plan on the weights it was made from gives exactly the weights
``fxprune.prune`` gave.

Example::

    >>> pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    >>> pruned.meta["fxprune_plan"].save("plan.json")
    >>> # later, maybe in another process, on the fine-tuned original:
    >>> again = fxprune.replay("plan.json", finetuned_model)
    >>> [p.shape for p in again.parameters()] == [p.shape for p in pruned.parameters()]
    True
"""

from __future__ import annotations

import os

from fxprune.api import analyze, apply
from fxprune.errors import PlanError
from fxprune.io.plans import PruningPlan


def replay(plan, model, example_inputs=None, *, kwargs=None, inplace: bool | None = None):
    """Apply ``plan`` (a :class:`PruningPlan` or the path of its JSON file) to ``model``.

    ``example_inputs`` and ``kwargs`` default to tensors of the shapes and dtypes
    recorded in the plan. ``inplace`` defaults to what the plan was made with
    (a Hugging Face model pruned in place is replayed in place). Returns what
    ``fxprune.apply`` returns: a verified GraphModule, or the model itself in place.
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = PruningPlan.load(plan)
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"replay takes a PruningPlan or the path of a plan file, got {type(plan).__name__}")
    recorded_args, recorded_kwargs = plan.example_inputs()
    if example_inputs is None:
        if recorded_args is None:
            raise PlanError("the plan does not record its example inputs; pass example_inputs to replay")
        example_inputs = recorded_args
        kwargs = recorded_kwargs if kwargs is None else kwargs
    inplace = plan.inplace if inplace is None else inplace
    # the plan names the units to remove, whatever policy chose them: head dims may be among them
    dg = analyze(model, tuple(example_inputs), kwargs=kwargs, inplace=inplace, prune_head_dims=True)
    result = apply(dg, plan.removal(dg), inplace=inplace)
    return result
