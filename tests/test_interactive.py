"""Interactive pruning: fxprune.groups_to_prune yields each prunable group with its scores; apply the choice."""

import numpy as np
import pytest
import torch

import fxprune
from fxprune.importance import Magnitude, score_groups
from tests import models

X = (torch.randn(2, 3, 8, 8),)


def test_groups_to_prune_yields_the_scores_prune_uses_and_apply_takes_the_choice():
    model = models.ResidualCNN().eval()
    dg = fxprune.analyze(model, X)
    seen = list(fxprune.groups_to_prune(dg, importance="l2"))
    assert [g for g, _ in seen] == dg.prunable_groups
    expected = score_groups(Magnitude(2), dg, dg.prunable_groups)
    for group, scores in seen:
        assert scores.shape == (group.units,)
        np.testing.assert_allclose(scores, expected[group])
    chosen = {}
    for group, scores in fxprune.groups_to_prune(dg):
        if group is dg.group_of("down.weight", 0):
            continue  # the caller leaves this group alone
        chosen[group] = np.argsort(scores)[: group.units // 2]
    pruned = fxprune.apply(dg, chosen)
    assert pruned.get_submodule("down").out_channels == 32
    assert pruned.get_submodule("block.0").out_channels == 12 and pruned.get_submodule("stem.0").out_channels == 8
    assert fxprune.plan_of(pruned).removal(fxprune.analyze(model, X)).keys()


def test_groups_to_prune_takes_a_callable_and_a_subset_and_refuses_frozen_groups():
    dg = fxprune.analyze(models.ResidualCNN().eval(), X)
    group = dg.group_of("down.weight", 0)
    out = list(fxprune.groups_to_prune(dg, lambda g, weights: torch.arange(g.units, dtype=torch.float),
                                       groups=[group]))
    assert len(out) == 1 and out[0][0] is group and out[0][1].tolist() == list(range(32))
    with pytest.raises(ValueError, match="cannot be pruned"):
        next(fxprune.groups_to_prune(dg, groups=[dg.group_of("head.weight", 0)]))
