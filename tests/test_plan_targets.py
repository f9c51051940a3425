"""Targets: ``target_macs`` / ``target_params`` land within 2%; the plan's count equals the pruned model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.analysis.macs import estimate
from fxprune.testing import plant_dead_units
from tests import models


@pytest.mark.parametrize("make, x", [
    (models.ResidualCNN, torch.randn(2, 3, 8, 8)),
    (models.ViTBlock, torch.randn(2, 5, 12)),
    (models.LSTMHead, torch.randn(2, 7, 6)),
    (models.DenseBlock, torch.randn(2, 3, 8, 8)),
])
def test_a_plans_count_equals_the_pruned_models(make, x):
    model = make().eval()
    dg = fxprune.analyze(model, (x,))
    removal = plant_dead_units(dg, dg.prunable_groups, fraction=0.4)
    pruned = fxprune.apply(dg, removal)
    assert estimate(dg, removal) == fxprune.count(pruned, (x,))
    assert estimate(dg, {}) == fxprune.count(model, (x,))


def test_resnet50_target_macs_half_with_round_to_8():
    model = torchvision.models.resnet50().eval()
    x = (torch.randn(1, 3, 64, 64),)
    macs, _ = fxprune.count(model, x)
    pruned = fxprune.prune(model, example_inputs=x, target_macs=0.5, round_to=8)
    kept = fxprune.count(pruned, x)[0] / macs
    assert abs(kept - 0.5) <= 0.02 * 0.5, kept
    original = dict(model.named_modules())
    changed = [(name, m.out_channels) for name, m in pruned.named_modules()
               if isinstance(m, nn.Conv2d) and m.out_channels != original[name].out_channels]
    assert len(changed) > 30
    assert all(width % 8 == 0 for _, width in changed), changed


def small_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                mlp_dim=128, num_classes=10).eval()


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_vit_targets_land_within_two_percent(kind):
    model, x = small_vit(), (torch.randn(1, 3, 32, 32),)
    before = fxprune.count(model, x)
    pruned = fxprune.prune(model, example_inputs=x, **{f"target_{kind}": 0.5}, round_to=1)  # 4 heads, 64 wide
    after = fxprune.count(pruned, x)
    kept = after[0] / before[0] if kind == "macs" else after[1] / before[1]
    assert abs(kept - 0.5) <= 0.01, kept
    with torch.no_grad():
        assert pruned(*x).shape == (1, 10)


def test_global_target_and_unreachable_target_warns():
    torch.manual_seed(0)
    # fine-grained groups (one unit is ~0.2% of the MACs); on a tiny CNN one channel can be 3%
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    before = fxprune.count(model, (torch.randn(4, 32),))[0]
    pruned = fxprune.prune(model, example_inputs=(torch.randn(4, 32),), target_macs=0.6, global_pruning=True,
                           round_to=1)
    assert abs(fxprune.count(pruned, (torch.randn(4, 32),))[0] / before - 0.6) <= 0.012
    x = (torch.randn(2, 3, 8, 8),)
    model = models.ResidualCNN().eval()
    with pytest.warns(UserWarning, match="target_macs=0.001 reached"):
        fxprune.prune(model, example_inputs=x, target_macs=0.001)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_macs": 0.5, "ratio": 0.3}, "ratio or target_macs"),
    ({"target_macs": 0.5, "target_params": 0.5}, "not both"),
    ({"target_params": 1.5}, r"target_params is the fraction .* in \(0, 1\]"),
])
def test_bad_targets_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fxprune.prune(models.ResidualCNN(), example_inputs=(torch.randn(2, 3, 8, 8),), **kwargs)
