"""Global pruning towards a MACs target by cost: score per MAC saved, scores normalised per group type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
import fxprune.testing
from fxprune.analysis.macs import estimate
from fxprune.planning.costs import group_types, unit_costs
from fxprune.planning.planner import make_plan
from fxprune.planning.selection import cost_plan
from fxprune.planning.target import search_by_cost, search_ratio
from tests import models


def wide_and_narrow():
    """Two hidden groups of 32: a unit of the first feeds from 256 inputs (288 MACs a row), one of the second 36."""
    model = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    dg = fxprune.analyze(model, (torch.randn(2, 256),))
    wide, narrow = dg.group_of("0.weight", 0), dg.group_of("2.weight", 0)
    return dg, wide, narrow


def test_unit_costs_are_exact_for_one_group_and_tell_heads_from_mlp_units():
    dg = fxprune.analyze(models.ViTBlock().eval(), (torch.randn(2, 5, 12),))
    mlp = dg.group_of("mlp.0.weight", 0)
    heads = next(g for g in dg.prunable_groups if dg.role(g) == "outer factor")
    costs = unit_costs(dg, dg.prunable_groups, "macs")
    assert (costs[heads], costs[mlp]) == (11040.0, 640.0)  # (4 x 8 x 32 + 2 x 5 x 8) x 10 tokens; 64 x 10
    base = estimate(dg, {})[0]
    for group in dg.prunable_groups:  # a group's own count enters every op linearly: n units save n x cost
        half = group.units // 2
        assert base - estimate(dg, {group: np.arange(half)})[0] == half * costs[group]
    params = unit_costs(dg, [mlp], "params")
    assert params[mlp] == 32 + 1 + 32  # fc1 row and bias, fc2 column
    types = group_types(dg, dg.prunable_groups)
    assert types[heads] != types[mlp]


def test_group_types_share_a_type_across_layers_and_split_roles():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                               mlp_dim=128, num_classes=10).eval()
    dg = fxprune.analyze(vit, (torch.randn(1, 3, 32, 32),))
    types = group_types(dg, dg.prunable_groups)
    name = "encoder.layers.encoder_layer_{}.".format
    mlps = [dg.group_of(name(i) + "mlp.0.weight", 0) for i in (0, 1)]
    heads = [dg.groups_of(name(i) + "self_attention.out_proj.weight", 1)[0] for i in (0, 1)]
    assert types[mlps[0]] == types[mlps[1]] and types[heads[0]] == types[heads[1]]
    assert types[mlps[0]] != types[heads[0]]
    resnet = torchvision.models.resnet18().eval()
    dg = fxprune.analyze(resnet, (torch.randn(1, 3, 32, 32),))
    types = group_types(dg, dg.prunable_groups)
    inner = [dg.group_of(f"layer{i}.0.conv1.weight", 0) for i in (1, 3)]
    stream = [dg.group_of(f"layer{i}.0.conv2.weight", 0) for i in (1, 3)]
    assert types[inner[0]] == types[inner[1]] and types[stream[0]] == types[stream[1]]
    assert types[inner[0]] != types[stream[0]]


def test_cost_plan_reaches_a_macs_target_with_fewer_units_from_the_costlier_group():
    dg, wide, narrow = wide_and_narrow()
    groups = [wide, narrow]
    scores = {wide: np.linspace(1, 2, 32), narrow: np.linspace(1, 2, 32)}  # equal once normalised
    costs = unit_costs(dg, groups, "macs")
    assert costs[wide] == 8 * costs[narrow]  # 2 x 288 against 2 x 36
    by_cost = search_ratio(dg, lambda r: make_plan(groups, scores, r, global_pruning=True, costs=costs,
                                                   types=group_types(dg, groups)), "macs", 0.6)
    by_count = search_ratio(dg, lambda r: make_plan(groups, scores, r, global_pruning=True), "macs", 0.6)
    for result in (by_cost, by_count):
        assert abs(result.kept - 0.6) <= 0.02 * 0.6, result.kept
    lost = {name: {g: len(r.removal.get(g, ())) for g in groups}
            for name, r in (("cost", by_cost), ("count", by_count))}
    assert lost["cost"][wide] > lost["count"][wide] and lost["cost"][wide] > lost["cost"][narrow]
    assert sum(lost["cost"].values()) < 0.7 * sum(lost["count"].values()), lost  # 13 units against 24


def test_costs_at_a_plan_count_what_the_other_groups_left():
    dg, wide, narrow = wide_and_narrow()
    at = {wide: np.arange(13)}  # 19 of the wide group's 32 stay
    costs = unit_costs(dg, [wide, narrow], "macs", at=at)
    assert costs == {wide: 2 * (256 + 32), narrow: 2 * (19 + 4)}  # the middle Linear now has 19 inputs
    scores = {wide: np.linspace(1, 2, 32), narrow: np.linspace(1, 2, 32)}
    found = search_by_cost(dg, [wide, narrow], lambda r, c: cost_plan([wide, narrow], scores, r, c), "macs", 0.6)
    assert abs(found.kept - 0.6) <= 0.02 * 0.6 and len(found.removal[wide]) == 13 and narrow not in found.removal


def test_scores_are_normalised_per_group_type():
    _dg, a, b = wide_and_narrow()
    scores = {a: np.linspace(1, 2, 32), b: 1000 * np.linspace(1, 2, 32)}  # b's raw scores 1000 x larger
    costs = {a: 1.0, b: 1.0}
    apart = cost_plan([a, b], scores, 0.3, costs, types={a: "mlp", b: "heads"})
    shared = cost_plan([a, b], scores, 0.3, costs, types={a: "mlp", b: "mlp"})
    assert len(apart[a]) > 5 and len(apart[b]) > 5  # both lose units on one scale
    assert len(shared[a]) == 19 and b not in shared  # one normalisation: only the small-scale group loses
    # the units taken are the lowest-scoring ones of each group
    assert list(apart[a]) == list(range(len(apart[a])))


def test_cost_plan_keeps_caps_and_steps():
    _dg, a, b = wide_and_narrow()
    rng = np.random.default_rng(0)
    scores = {a: rng.random(32), b: rng.random(32)}
    steps, costs = {a: 8, b: 3}, {a: 5.0, b: 1.0}
    for ratio in (0.1, 0.3, 0.6, 0.999):
        plan = cost_plan([a, b], scores, ratio, costs, steps=steps, max_ratio=0.5)
        for group, units in plan.items():
            assert len(units) % steps[group] == 0 and len(units) <= 0.5 * group.units, (ratio, group, len(units))
            assert set(units) == set(np.argsort(scores[group], kind="stable")[:len(units)])
    assert {g: len(u) for g, u in plan.items()} == {a: 16, b: 15}  # everything allowed: 16 = 2 x 8, 15 = 5 x 3
    fixed = cost_plan([a, b], scores, 0.999, costs, steps=steps, fixed={b: 0.25}, caps={a: 8})
    assert {g: len(u) for g, u in fixed.items()} == {a: 8, b: 9}  # b planned locally (8 rounded to 9), a capped


def test_resnet18_global_target_macs_by_cost_lands_and_runs():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(2, 3, 32, 32),)
    before = fxprune.count(model, x)[0]
    pruned = fxprune.prune(model, example_inputs=x, target_macs=0.5, global_pruning=True, max_ratio=0.7,
                           ignore=["layer4.1.conv1"])
    kept = fxprune.count(pruned, x)[0] / before
    assert abs(kept - 0.5) <= 0.02 * 0.5, kept
    original = dict(model.named_modules())
    widths = {name: (m.out_channels, original[name].out_channels) for name, m in pruned.named_modules()
              if isinstance(m, nn.Conv2d)}
    assert all(new % 8 == 0 and new >= 0.3 * old for new, old in widths.values()), widths  # steps of 8, max_ratio
    assert widths["layer4.1.conv1"] == (512, 512)
    assert sum(new < old for new, old in widths.values()) >= 5  # non-uniform: several layers lose units
    with torch.no_grad():
        assert pruned(*x).shape == (2, 10)


def test_pruner_steps_by_cost_to_a_global_macs_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = (torch.randn(4, 64),)
    before = fxprune.count(model, x)[0]
    pruner = fxprune.Pruner(model, x, target_macs=0.6, steps=2, global_pruning=True, max_ratio=0.5, round_to=1)
    for _ in range(2):
        pruned = pruner.step()
    assert abs(fxprune.count(pruned, x)[0] / before - 0.6) <= 0.02 * 0.6
    widths = [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert widths[0] >= 64 and widths[1] >= 64 and widths[0] < 128, widths  # max_ratio of the original, by cost


def test_tiny_llama_types_and_global_target_by_cost():
    pytest.importorskip("transformers")
    model = fxprune.testing.tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    ids = torch.randint(0, 100, (2, 16))
    dg = fxprune.analyze(model, {"input_ids": ids})
    types = group_types(dg, dg.prunable_groups)
    mlp = [dg.group_of(f"model.layers.{i}.mlp.up_proj.weight", 0) for i in (0, 1)]
    stream = dg.group_of("model.norm.weight", 0)
    kv_heads = [g for g in dg.prunable_groups if dg.role(g) == "outer factor"]
    assert len(kv_heads) == 2 and types[kv_heads[0]] == types[kv_heads[1]] and types[mlp[0]] == types[mlp[1]]
    assert len({types[mlp[0]], types[kv_heads[0]], types[stream]}) == 3
    assert len(set(types.values())) == 4  # and the query heads of each kv head ("repeated")
    before = fxprune.count(model, (ids,))[0]
    pruned = fxprune.prune(model, example_inputs={"input_ids": ids}, target_macs=0.5, global_pruning=True)
    assert abs(fxprune.count(pruned, (ids,))[0] / before - 0.5) <= 0.02 * 0.5
    with torch.no_grad():
        out = pruned(input_ids=ids)
    assert (out.logits if hasattr(out, "logits") else out[0]).shape == (2, 16, 100)
