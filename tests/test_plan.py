"""Planning: local and global ranking, caps, per-module ratios, removal steps, at least one unit kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.planning.selection import global_plan, local_plan, round_keep, units_to_keep
from fxprune.planning.ratios import group_ratios
from tests import models


@dataclass(eq=False)  # hashed by identity, like fxprune's Group
class FakeGroup:
    name: str
    units: int


fake_group = FakeGroup


def as_lists(plan):
    return {g.name: sorted(int(u) for u in units) for g, units in plan.items()}


def test_units_to_keep_rounds_removal_to_the_step_and_keeps_one():
    assert units_to_keep(64, 0.3) == 45 and units_to_keep(64, 0.3, step=8) == 48
    assert units_to_keep(10, 0.99) == 1 and units_to_keep(3, 0.4, step=8) == 3  # cannot lose 8 of 3: whole
    assert round_keep(64, 3, step=8) == 8 and round_keep(64, 70, step=8) == 64
    assert round_keep(4096, 2867, step=8) == 2864 and round_keep(100, 50, step=8) == 52  # 48 removed
    assert round_keep(12, 1, step=8) == 4  # 8 removed at most: one unit always stays


def test_local_plan_removes_the_lowest_scores_of_every_group():
    a, b, c = fake_group("a", 4), fake_group("b", 6), fake_group("c", 2)
    scores = {a: np.array([4, 1, 3, 2.0]), b: np.array([6, 5, 4, 3, 2, 1.0])}  # c: no opinion, left whole
    assert as_lists(local_plan([a, b, c], scores, 0.5)) == {"a": [1, 3], "b": [3, 4, 5]}
    assert as_lists(local_plan([a, b], scores, 0.5, fixed={a: 0.25})) == {"a": [1], "b": [3, 4, 5]}


def test_global_plan_ranks_normalised_scores_across_groups():
    small, large = fake_group("small", 4), fake_group("large", 8)
    scores = {small: 100 * np.array([1, 2, 3, 4.0]), large: np.arange(1, 9.0)}
    # raw scores would take the 3 lowest from `large` only; normalised by the mean (250 and 4.5):
    # small = .4 .8 1.2 1.6, large = .22 .44 .67 .89 ... -> lowest three: large0, small0, large1
    assert as_lists(global_plan([small, large], scores, 0.25)) == {"small": [0], "large": [0, 1]}


def test_global_plan_caps_each_group():
    a, b = fake_group("a", 10), fake_group("b", 10)
    scores = {a: np.arange(10.0), b: np.arange(10.0) + 100}
    plan = global_plan([a, b], scores, 0.5, max_ratio=0.3, normalizer=None)
    assert as_lists(plan) == {"a": [0, 1, 2], "b": [0, 1, 2]}  # a alone would have lost 10 (capped at 3)
    plan = global_plan([a, b], scores, 0.5, normalizer=None)
    assert as_lists(plan) == {"a": list(range(9)), "b": [0]}  # default cap 0.9: 9 of a, then b


def test_global_pruning_on_a_model_keeps_at_least_one_unit_and_respects_max_ratio():
    x = (torch.randn(2, 3, 8, 8),)
    pruned = fxprune.prune(models.ResidualCNN(), 0.8, example_inputs=x, global_pruning=True, max_ratio=0.5,
                           round_to=1)
    widths = [pruned.get_submodule(n).out_channels for n in ("stem.0", "block.0", "down")]
    assert widths == [8, 12, 16]  # every group capped at half
    pruned = fxprune.prune(models.ResidualCNN(), 0.3, example_inputs=x, global_pruning=True, round_to=1)
    before = 16 + 24 + 32
    after = sum(pruned.get_submodule(n).out_channels for n in ("stem.0", "block.0", "down"))
    assert after == before - round(0.3 * before)


def test_ratios_by_module_name_object_and_group():
    x = (torch.randn(2, 3, 8, 8),)
    model = models.ResidualCNN().eval()
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ratios={"block.0": 0.25, model.down: 0.0}, round_to=1)
    assert pruned.get_submodule("block.0").out_channels == 18  # its own ratio
    assert pruned.down.out_channels == 32  # produced by `down`: kept
    assert pruned.get_submodule("stem.0").out_channels == 8  # the default ratio
    dg = fxprune.analyze(model, x)
    stream = dg.group_of("stem.0.weight", 0)
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ratios={stream.id: 0.75}, round_to=1)
    assert pruned.get_submodule("stem.0").out_channels == 4 and pruned.down.out_channels == 16


def test_ratios_take_the_smallest_of_overlapping_keys_and_follow_producers():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
                          nn.ReLU(), nn.Linear(8, 2))
    dg = fxprune.analyze(model, (torch.randn(2, 4),))
    ratios = group_ratios(dg, {"2": 0.5, "2.2": 0.25})
    produced = {g: dg.group_of(name, 0) for g, name in (("inner", "2.0.weight"), ("last", "2.2.weight"))}
    assert ratios == {produced["inner"]: 0.5, produced["last"]: 0.25}
    assert dg.group_of("0.weight", 0) not in ratios  # read by "2.0" but produced outside "2"


def test_bad_ratios_name_the_problem():
    x = (torch.randn(2, 3, 8, 8),)
    with pytest.raises(ValueError, match=r"ratios\['nope'\].*|no parameter named 'nope'"):
        fxprune.prune(models.ResidualCNN(), 0.5, example_inputs=x, ratios={"nope": 0.5}, round_to=1)
    with pytest.raises(ValueError, match=r"ratios\['stem'\] must be a number in \[0, 1\)"):
        fxprune.prune(models.ResidualCNN(), 0.5, example_inputs=x, ratios={"stem": 1.5}, round_to=1)
    with pytest.raises(ValueError, match="max_ratio"):
        fxprune.prune(models.ResidualCNN(), 0.5, example_inputs=x, global_pruning=True, max_ratio=0, round_to=1)


def test_heads_are_units_of_their_own_group():
    model = models.ViTBlock().eval()
    x = (torch.randn(2, 5, 12),)
    dg = fxprune.analyze(model, x)
    heads = [g for g in dg.prunable_groups if dg.role(g) == "outer factor"]
    assert heads, dg.report()
    plan = local_plan(heads, {g: np.arange(g.units, dtype=float) for g in heads}, 0.5)
    pruned = fxprune.apply(dg, plan)
    assert all(len(units) == heads[i].units // 2 for i, units in enumerate(plan.values()))
    with torch.no_grad():
        assert pruned(*x).shape == model(*x).shape
