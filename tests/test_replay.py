"""Pruning plans: JSON round trip, stable group keys, replay gives the same weights, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxprune
import fxprune.testing
from fxprune.io.plans import GroupKey
from fxprune.testing import assert_same_outputs, assert_same_state
from tests import models

CASES = {  # name: (factory, example input shape); together they cover whole axes, products, segments, heads
    "ResidualCNN": (models.ResidualCNN, (2, 3, 8, 8)),
    "GroupedConv": (models.GroupedConv, (2, 3, 8, 8)),
    "DenseBlock": (models.DenseBlock, (2, 3, 8, 8)),
    "ViTBlock": (models.ViTBlock, (2, 5, 12)),
}


def build(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    return factory().eval(), (torch.randn(shape, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("name", list(CASES))
def test_replay_from_json_gives_the_same_weights_and_outputs(name, tmp_path):
    model, x = build(name)
    fresh = copy.deepcopy(model)
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    path = fxprune.plan_of(pruned).save(tmp_path / "plan.json")

    again = fxprune.replay(fxprune.PruningPlan.load(path), fresh, x)

    assert_same_state(again, pruned)
    with torch.no_grad():
        assert_same_outputs(again(*x), pruned(*x))


def test_plan_json_round_trip_is_lossless(tmp_path):
    model, x = build("GroupedConv")
    plan = fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=x, round_to=2))
    loaded = fxprune.PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["format"] == "fxprune-plan"
    assert data["settings"]["ratio"] == 0.5 and data["settings"]["round_to"] == 2
    assert all(len(g["kept"]) < g["units"] for g in data["groups"])


def test_groups_are_keyed_by_their_first_parameter_axis_and_position():
    # conv2 (groups=4) splits conv1's output channels into 4 conv groups x 4 channels per group
    model, x = build("GroupedConv")
    plan = fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=x))
    keys = {g.key: g.units for g in plan.groups}
    assert keys[GroupKey("bn.bias", 0, 0)] == 4  # the conv groups: first factor of bn's channel axis
    assert keys[GroupKey("bn.bias", 0, 1)] == 6  # channels per conv group of conv2's output
    assert keys[GroupKey("conv1.bias", 0, 1)] == 4  # channels per conv group of conv1's output


def test_replay_without_inputs_uses_the_recorded_shapes():
    model, x = build("ResidualCNN")
    fresh = copy.deepcopy(model)
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    plan = fxprune.PruningPlan.from_dict(fxprune.plan_of(pruned).to_dict())
    args, _ = plan.example_inputs()
    assert args[0].shape == x[0].shape and args[0].dtype == x[0].dtype
    assert_same_state(fxprune.replay(plan, fresh), pruned)


def test_replay_on_fine_tuned_weights_keeps_the_same_units():
    model, x = build("ResidualCNN")
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)  # "fine-tuning" that would change a magnitude ranking
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    again = fxprune.replay(fxprune.plan_of(pruned), tuned, x)
    params = dict(pruned.named_parameters())
    for name, p in again.named_parameters():
        assert torch.equal(p, params[name] + 1.0), name


def test_apply_records_exactly_the_units_it_removed():
    model, x = build("ResidualCNN")
    dg = fxprune.analyze(model, x)
    group = dg.prunable_groups[0]
    plan = fxprune.plan_of(fxprune.apply(dg, {group: [0, 3]}))
    entry = next(g for g in plan.groups if g.units == group.units and 0 not in g.kept)
    assert entry.removed == [0, 3]
    assert sum(len(g.removed) for g in plan.groups) == 2


def test_a_plan_for_another_width_is_refused_with_the_unit_counts():
    model, x = build("ResidualCNN")
    plan = fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=x))
    with pytest.raises(fxprune.PlanError, match="has 16 units but the model's has 12"):
        fxprune.replay(plan, models.ResidualCNN(width=12), x)


def test_a_plan_for_another_model_is_refused_with_the_missing_axis():
    model, x = build("ResidualCNN")
    plan = fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=x))
    with pytest.raises(fxprune.PlanError, match="no parameter axis"):
        fxprune.replay(plan, models.GroupedConv(), x)


def test_loaded_pruned_model_carries_its_plan(tmp_path):
    model, x = build("ResidualCNN")
    fresh = copy.deepcopy(model)
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    loaded = fxprune.load(fxprune.save(pruned, tmp_path / "pruned"))
    assert_same_state(fxprune.replay(fxprune.plan_of(loaded), fresh, x), pruned)


def test_plan_of_an_unpruned_model_is_a_clear_error():
    with pytest.raises(fxprune.PlanError, match="carries no pruning plan"):
        fxprune.plan_of(models.ResidualCNN())


def test_hugging_face_in_place_plan_replays_in_place():
    pytest.importorskip("transformers")
    model = fxprune.testing.tiny_llama(vocab_size=50)
    fresh = copy.deepcopy(model)
    ids = torch.randint(0, 50, (1, 6))
    fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    plan = fxprune.PruningPlan.from_dict(fxprune.plan_of(model).to_dict())
    assert plan.inplace
    again = fxprune.replay(plan, fresh)  # inputs and in-place mode come from the plan
    assert again is fresh
    assert_same_state(fresh, model)
