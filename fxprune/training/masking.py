"""Soft pruning: zero the planned units' slices in place, without rewriting (for sparse-training loops).

``fxprune.mask`` plans like ``fxprune.prune`` (or takes a plan), then writes zeros
into every member slice of the planned units — producer weights, biases, norm
scales and shifts, running statistics, consumer weights: the slices
``fxprune.apply`` would cut out. The model keeps its shapes, so training goes on
with the same optimizer; masked units stay dead only if the caller masks again
after each update (gradients still reach them). A group that some op normalises
over (``Group.normalized``: LayerNorm, softmax, mean) changes the output when
its units are zeroed, as it does when they are removed.

Example::

    >>> dg = fxprune.analyze(model, (x,))
    >>> for epoch in range(epochs):
    ...     train_one_epoch(model)
    ...     plan = fxprune.mask(dg, 0.5)          # scores the current weights, zeroes the weakest half
    >>> pruned = fxprune.replay(plan, model)      # cut the masked units out for real
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.api import analyze, check_prune_settings
from fxprune.analysis.depgraph import DependencyGraph
from fxprune.importance import named_tensors
from fxprune.io.plans import PruningPlan
from fxprune.pipeline import PRUNING, Job, Settings, run
from fxprune.analysis.removal import kept_units


def zero_units(dg, removal: dict) -> None:
    """Zero every parameter and buffer slice of the given units ``{group: units}`` of ``dg``'s model, in place."""
    tensors = named_tensors(dg.gm)
    with torch.no_grad():
        for group, units in removal.items():
            units = np.asarray(list(units), dtype=np.int64)
            if units.size == 0:
                continue
            for member in group.members:
                if member.kind == "activation" or member.name not in tensors:
                    continue
                tensor = tensors[member.name]  # the index on the tensor's device (CUDA, meta ...)
                index = torch.as_tensor(member.indices(group, units), dtype=torch.long, device=tensor.device)
                tensor.index_fill_(member.dim, index, 0.0)


def mask(model_or_dg, plan_or_ratio=0.3, *, example_inputs=None, kwargs=None, importance="l2", ignore=(),
         round_to=None, prune_head_dims: bool = False, global_pruning: bool = False, max_ratio: float = 0.9,
         ratios: dict | None = None, isomorphic: bool = False):
    """Zero the units a plan removes, in place, and return that :class:`~fxprune.PruningPlan`.

    ``model_or_dg``: a model (analysed here with ``example_inputs``) or a
    :class:`~fxprune.DependencyGraph` from ``fxprune.analyze`` (analyse once, mask
    every epoch: the graph holds the model's own tensors). ``plan_or_ratio``: a
    ratio (planned as ``fxprune.prune`` plans it, with ``importance``, ``round_to``,
    ``global_pruning``, ``isomorphic``, ``max_ratio``, ``ratios``), a ``{group: units}`` removal,
    or a :class:`~fxprune.PruningPlan`. The returned plan replays on the model
    (``fxprune.replay(plan, model)``) to remove the masked units for real.
    """
    if isinstance(model_or_dg, DependencyGraph):
        dg = model_or_dg
    else:
        dg = analyze(model_or_dg, example_inputs, kwargs=kwargs, ignore=ignore, prune_head_dims=prune_head_dims)
    settings = {}
    if isinstance(plan_or_ratio, PruningPlan):
        removal = plan_or_ratio.removal(dg)
    elif isinstance(plan_or_ratio, dict):
        by_id = {g.id: g for g in dg.groups}
        removal = {by_id[g] if isinstance(g, int) else g: units for g, units in plan_or_ratio.items()}
    elif isinstance(plan_or_ratio, (int, float)) and not isinstance(plan_or_ratio, bool):
        ratio, _, max_ratio = check_prune_settings(plan_or_ratio, None, None, round_to, max_ratio,
                                                   global_pruning=global_pruning, isomorphic=isomorphic)
        asked = Settings(ratio=ratio, importance=importance, round_to=round_to, prune_head_dims=prune_head_dims,
                         global_pruning=bool(global_pruning), isomorphic=bool(isomorphic), max_ratio=max_ratio,
                         ratios=ratios)
        job = Job(dg.model, dg.model_inputs, dg.model_kwargs, asked, gm=dg.gm, dg=dg)
        run(job, [(name, fn) for name, fn in PRUNING if name in ("score", "plan")])
        removal = job.removal
        settings = {"ratio": job.ratio, "importance": importance, "round_to": round_to, "alignment": job.alignment}
    else:
        raise TypeError(f"mask takes a ratio, a {{group: units}} removal or a PruningPlan, "
                        f"got {type(plan_or_ratio).__name__}")
    kept_units(dg, removal)  # frozen groups, units out of range, a whole group: a PlanError naming the group
    zero_units(dg, removal)
    return PruningPlan.from_removal(dg, removal, settings={"masked": True, **settings})
