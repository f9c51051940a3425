"""What a unit costs and what kind of unit it is: the inputs of global pruning towards a MACs or parameter target.

*Cost.* Global pruning with ``target_macs`` (or ``target_params``) spends the budget where
it hurts least per MAC (parameter) saved, so each prunable group needs the MACs that one of
its units is worth. :func:`unit_costs` measures it with the exact counter: the plan that
removes one removal step of that group alone, counted by :func:`fxprune.analysis.macs.estimate`
(shapes from layouts, nothing rewritten), divided by the step. A group's own count enters
every op it touches linearly — a conv's MACs are ``C_out x C_in x k x k x H x W``, attention's
score matrix is ``heads x L x L x head_dim`` — so removing ``n`` units of one group alone saves
exactly ``n`` times this cost (the tests check it on a ViT's heads and MLP units). What is
*not* linear is the interplay of two pruned groups in one op (``C_out`` and ``C_in`` of the
same conv both shrink): a unit then saves less than it did in the whole model. The costs are
therefore a first-order estimate that ranks units; the target search counts every
candidate plan exactly, so the plan still lands on the target.

*Type.* Scores of different structural roles live on different scales (the L2 norm of an
attention head's rows against that of one MLP unit), while groups of one role are
comparable with each other. :func:`group_types` gives each group a signature from what the
dependency graph knows — its role (:meth:`~fxprune.analysis.depgraph.DependencyGraph.role`: whole axis,
outer factor such as heads, rotary pairs, repeated), whether a norm normalises over it, and
the kinds of parameter axes it appears in (module class, parameter, axis, once or several
times) — so that attention heads, MLP hidden units, a block's inner conv channels and the
residual stream (it appears in several convolutions' outputs) are four types, and the MLP
units of layer 1 and layer 7 are one.

Measured (``benchmarks/global_cost_digits.py``, a small ResNet on 16x16 digits, half the
MACs): the units of the stem and the first stage cost the most MACs (16 x 16 pixels against
4 x 4), so with L2 or activation scores the cost ranking empties them first (32 channels to 8)
and keeps the last stage whole; right after pruning its logits are further off than uniform
pruning's (relative error 2.8 against 1.0 with L2), and after 3 epochs of fine-tuning it is
0.3 points of test accuracy above uniform at widths 16-64 and 1.4 below at 32-128. Magnitude scores are not losses: ``max_ratio`` (0.5 there: error
1.1 against 0.94 with activation scores) bounds how far one group goes.

Example: ``tests.models.ViTBlock`` (hidden 32, 4 heads 8 wide, 2 x 5 tokens): a head is worth
its q, k, v rows and proj columns (4 x 8 x 32) and its share of ``q k^T`` and ``attn v``
(2 x 5 x 8) per token; an MLP unit 32 + 32 per token::

    >>> costs = unit_costs(dg, dg.prunable_groups, "macs")
    >>> costs[heads], costs[mlp]        # (1024 + 80) x 10 tokens, 64 x 10 tokens
    (11040.0, 640.0)
    >>> types = group_types(dg, [heads, mlp])
    >>> types[heads] != types[mlp]      # outer factor against whole axis
    True
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fxprune.analysis.macs import estimate

METRICS = ("macs", "params")


def unit_costs(dg, groups, metric: str, steps: dict | None = None, at: dict | None = None) -> dict:
    """``{group: metric saved per unit}``: removing one step of ``group`` alone, counted exactly, over the step.

    ``steps`` (``{group: step}`` from :func:`fxprune.planning.alignment.removal_steps`)
    measures whole steps, the smallest removal the plan can make. A group that saves
    nothing (cost 0) is one that removing does not bring closer to the target.

    ``at`` (a removal plan) measures the costs with the other groups pruned as in that plan:
    a group it prunes is worth what its removed units save there, on average (the plan
    against the plan with that group whole); another group, what one more step saves. The
    target search re-plans once with these costs, where several groups of one op shrink together.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    index, steps, at = METRICS.index(metric), steps or {}, dict(at or {})
    base = estimate(dg, at)[index]
    out = {}
    for group in groups:
        removed = len(at.get(group, ()))
        if removed:
            whole = {g: u for g, u in at.items() if g is not group}
            out[group] = (estimate(dg, whole)[index] - base) / removed
            continue
        step = max(1, min(steps.get(group, 1), group.units - 1))
        out[group] = (base - estimate(dg, {**at, group: np.arange(step)})[index]) / step
    return out


def group_types(dg, groups) -> dict:
    """``{group: hashable type}``: groups of one structural role share a type (see the module docstring)."""
    modules = dict(dg.gm.named_modules())
    return {group: _signature(dg, group, modules) for group in groups}


def _signature(dg, group, modules: dict) -> tuple:
    axes = Counter()
    for member in group.parameters:
        owner, _, leaf = member.name.rpartition(".")
        kind = type(modules[owner]).__name__ if owner in modules else "?"
        axes[(kind, leaf, member.dim)] += 1
    # once or several times: the residual stream runs through many convs' outputs, a block's inner channels one
    parts = frozenset((kind, leaf, dim, min(count, 2)) for (kind, leaf, dim), count in axes.items())
    return dg.role(group), bool(group.normalized), bool(group.head_dim), parts
