"""Soft pruning: fxprune.mask zeroes the planned units' slices in place and returns a plan that replays."""

import pytest
import torch

import fxprune
from fxprune.testing import assert_same_outputs
from tests import models

X = (torch.randn(2, 3, 8, 8),)


def test_mask_zeroes_every_member_slice_in_place_and_its_plan_replays_to_the_same_outputs():
    model = models.ResidualCNN().eval()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    plan = fxprune.mask(model, 0.5, example_inputs=X, round_to=1)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # nothing rewritten
    entry = next(g for g in plan.groups if g.key.tensor == "block.0.bias")
    assert len(entry.removed) == 12
    assert torch.all(model.block[0].weight[entry.removed] == 0) and torch.all(model.block[0].bias[entry.removed] == 0)
    assert torch.all(model.block[1].weight[entry.removed] == 0) and torch.all(model.block[1].bias[entry.removed] == 0)
    assert torch.all(model.block[3].weight[:, entry.removed] == 0)
    masked = model(*X)
    pruned = fxprune.replay(plan, model, X)
    assert pruned.get_submodule("block.0").out_channels == 12
    assert_same_outputs(pruned(*X), masked)


def test_mask_on_a_dependency_graph_with_a_removal_or_a_plan():
    model = models.ResidualCNN().eval()
    dg = fxprune.analyze(model, X)
    group = dg.group_of("down.weight", 0)
    plan = fxprune.mask(dg, {group: [0, 3]})
    assert torch.all(model.down.weight[[0, 3]] == 0) and torch.all(model.head.weight[:, [0, 3]] == 0)
    assert model.down.weight[1].abs().sum() > 0
    fresh = models.ResidualCNN().eval()
    fxprune.mask(fresh, plan, example_inputs=X)
    assert torch.all(fresh.down.bias[[0, 3]] == 0)
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.mask(dg, {dg.group_of("head.weight", 0): [0]})
    with pytest.raises(TypeError, match="mask takes"):
        fxprune.mask(dg, "half")


def test_mask_reaches_the_tensors_of_a_model_captured_with_torch_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128)
    model, ids = transformers.BertModel(config).eval(), torch.randint(0, 100, (2, 7))
    fxprune.mask(model, 0.5, example_inputs=(ids,), round_to=1)
    weight = model.encoder.layer[0].intermediate.dense.weight
    assert int((weight.abs().sum(1) == 0).sum()) == 64  # the caller's own parameters were zeroed
