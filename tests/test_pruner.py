"""Iterative pruning (steps reach the final ratio or target) and sparse-training regularisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.testing
from tests import models
from tests.models import bn_mlp, fixed_mlp

X = (torch.randn(2, 3, 8, 8),)
NAMES = ("stem.0", "block.0", "down")


def widths(model):
    return [model.get_submodule(n).out_channels for n in NAMES]


@pytest.mark.parametrize("round_to", [1, 4])
def test_steps_end_exactly_where_one_shot_pruning_does(round_to):
    model = models.ResidualCNN().eval()
    pruner = fxprune.Pruner(model, X, ratio=0.6, steps=3, round_to=round_to)
    seen = [widths(model)]
    for _ in range(3):
        seen.append(widths(pruner.step()))
    one_shot = fxprune.prune(model, 0.6, example_inputs=X, round_to=round_to)
    assert seen[-1] == widths(one_shot)
    assert all(a >= b for before, after in zip(seen, seen[1:]) for a, b in zip(before, after))
    if round_to == 1:  # linear schedule: 0.2, 0.4, 0.6 of the original units
        assert seen[1] == [13, 19, 26] and seen[2] == [10, 14, 19]
    assert widths(model) == [16, 24, 32]  # the user's model is untouched
    with pytest.raises(RuntimeError, match="all 3 steps are done"):
        pruner.step()


def test_steps_follow_heads_and_head_dims_across_re_analyses():
    model, x = models.ViTBlock().eval(), (torch.randn(2, 5, 12),)
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, round_to=1)
    pruner.step()
    final = pruner.step()
    one_shot = fxprune.prune(model, 0.5, example_inputs=x, round_to=1)
    assert {n: p.shape for n, p in final.named_parameters()} == {n: p.shape for n, p in one_shot.named_parameters()}


def test_target_macs_in_steps():
    model = models.ResidualCNN().eval()
    before = fxprune.count(model, X)[0]
    pruner = fxprune.Pruner(model, X, target_macs=0.4, steps=3, round_to=1)
    kept = [fxprune.count(pruner.step(), X)[0] / before for _ in range(3)]
    np.testing.assert_allclose(kept, [0.8, 0.6, 0.4], atol=0.02)


def test_global_steps_keep_the_total_and_the_cap_of_the_original():
    model = models.ResidualCNN().eval()
    pruner = fxprune.Pruner(model, X, ratio=0.5, steps=2, global_pruning=True, max_ratio=0.6, round_to=1)
    pruner.step()
    final = widths(pruner.step())
    assert sum(final) == 72 - 36
    assert all(w >= original - int(0.6 * original) for w, original in zip(final, (16, 24, 32)))


def test_custom_schedule_and_bad_settings():
    pruner = fxprune.Pruner(models.ResidualCNN().eval(), X, ratio=0.5, steps=2, schedule=lambda k, n: (k / n) ** 2, round_to=1)
    assert widths(pruner.step()) == [14, 21, 28]  # a quarter of the way: 0.125 of the units
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fxprune.Pruner(models.ResidualCNN(), X, ratio=0.5, steps=0, round_to=1)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        fxprune.Pruner(models.ResidualCNN(), X, ratio=0.5, schedule="cosine", round_to=1)
    with pytest.raises(ValueError, match="unknown regularizer 'l0'"):
        fxprune.Pruner(models.ResidualCNN(), X, ratio=0.5, regularizer="l0", round_to=1)


def test_group_norm_regularizer_adds_adaptive_strength_times_weight():
    model = fixed_mlp()  # group norms of the 4 hidden units: sqrt(2.25, 5, 9, 7)
    pruner = fxprune.Pruner(model, (torch.randn(2, 3),), ratio=0.5, regularizer="group_norm", reg=0.1, alpha=4, round_to=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model)
    norms = np.sqrt([2.25, 5, 9, 7])
    gamma = torch.tensor(2.0 ** (4 * (norms.max() - norms) / (norms.max() - norms.min())), dtype=torch.float32)
    torch.testing.assert_close(model[0].weight.grad, 0.1 * gamma[:, None] * model[0].weight)
    torch.testing.assert_close(model[0].bias.grad, 0.1 * gamma * model[0].bias)
    torch.testing.assert_close(model[2].weight.grad, 0.1 * gamma[None, :] * model[2].weight)
    assert torch.equal(model[2].bias.grad, torch.zeros(2))  # the logits are frozen: no group, no pull
    assert gamma[2] == 1 and gamma[0] == 16  # strongest unit 1x, weakest 2**alpha


def test_bn_scale_regularizer_is_l1_on_batchnorm_weights():
    model = bn_mlp([0.5, -1.0, 2.0, -0.1])
    pruner = fxprune.Pruner(model, (torch.randn(4, 3),), ratio=0.5, regularizer="bn_scale", reg=0.01, round_to=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model)
    torch.testing.assert_close(model[1].weight.grad, torch.tensor([0.01, -0.01, 0.01, -0.01]))
    assert all(float(p.grad.abs().sum()) == 0 for n, p in model.named_parameters() if n != "1.weight")
    assert pruner.criterion.name == "bn_scale"  # slimming prunes by the scales it sparsified


def test_sparse_training_drives_weak_units_to_zero_then_prunes_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    pruner = fxprune.Pruner(model, (x[:2],), ratio=0.5, regularizer="group_norm", reg=0.05, alpha=4, round_to=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(30):
        pruner.update_regularizer()
        for i in range(0, 256, 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            pruner.regularize(model)
            optimizer.step()
    norms = (model[0].weight.pow(2).sum(1) + model[0].bias.pow(2) + model[2].weight.pow(2).sum(0)).sqrt().detach()
    weakest = torch.argsort(norms)[:8]
    assert norms[weakest].max() < 0.1 * norms.max()  # half the units were driven (nearly) to zero
    with torch.no_grad():
        before = model(x)
    pruned = pruner.step()
    kept = sorted(set(range(16)) - set(weakest.tolist()))
    torch.testing.assert_close(pruned.get_submodule("0").weight, model[0].weight[kept])
    with torch.no_grad():
        assert (pruned(x).argmax(1) == before.argmax(1)).float().mean() > 0.95
    pruner.update_regularizer()
    with pytest.raises(ValueError, match=r"regularize the pruned model \(pruner.model\)"):
        pruner.regularize(model)  # the unpruned model no longer matches the groups
    pruner.regularize(pruned)  # the pruned one does (no .grad yet: nothing to add, no error)


@pytest.mark.parametrize("make, inputs, settings", [
    (models.ResidualCNN, X, {"ratio": 0.6}), (models.ResidualCNN, X, {"target_macs": 0.4, "global_pruning": True}),
    (models.ViTBlock, (torch.randn(2, 5, 12),), {"ratio": 0.6})])
def test_steps_compose_into_one_plan_that_replays_on_the_original(make, inputs, settings):
    model = make().eval()
    pruner = fxprune.Pruner(model, inputs, steps=3, round_to=1, **settings)
    for _ in range(3):
        final = pruner.step()
    plan = fxprune.plan_of(final)
    again = fxprune.replay(fxprune.PruningPlan.from_dict(plan.to_dict()), model, inputs)
    assert plan.settings["steps"] == 3 and ("ratio" in plan.settings) == ("ratio" in settings)
    expected = dict(final.named_parameters())
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in expected.items()}
    for name, p in again.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0)
    fxprune.testing.assert_same_outputs(again(*inputs), final(*inputs))


def test_steps_with_calibration_refit_each_step():
    """``Pruner(..., importance="activation", calibration=..., reconstruct=True)``: every step refits the layers
    after the pruned units, so after two steps the output error is far below plain pruning's; the plan says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    batches = [torch.randn(64, 8) for _ in range(8)]
    held_out = torch.randn(256, 8)
    with torch.no_grad():
        expected = model(held_out)
    errors = {}
    for reconstruct in (False, True):
        pruner = fxprune.Pruner(model, (held_out[:2],), ratio=0.5, steps=2, round_to=1, importance="activation",
                                calibration=iter(batches) if reconstruct else batches, reconstruct=reconstruct)
        for _ in range(2):
            pruned = pruner.step()
        with torch.no_grad():
            errors[reconstruct] = ((pruned(held_out) - expected).square().mean() / expected.square().mean()).item()
    assert pruned.get_submodule("0").out_features == 16
    assert errors[True] < 0.2 * errors[False], errors
    assert fxprune.plan_of(pruned).settings.get("reconstruct") is True
    with pytest.raises(ValueError, match="sequential=True .* needs reconstruct=True"):
        fxprune.Pruner(model, (held_out[:2],), ratio=0.5, calibration=batches, sequential=True)


def test_steps_keep_ignoring_a_module_of_an_exported_hugging_face_model():
    """A Hugging Face model is captured by torch.export, whose graph holds copies of its modules: ``ignore`` given
    as the caller's module object is still found by name, so the second step (a fresh analysis of the pruned graph)
    keeps it whole too (it once failed: "module Embedding is not part of the model")."""
    model, example = models.tiny_transformers("bert")
    args, _ = example(2, 8)
    pruner = fxprune.Pruner(model, args, ratio=0.5, steps=2, ignore=[model.embeddings.word_embeddings],
                            round_to=1)
    pruner.step()
    pruned = pruner.step()
    assert pruned.get_parameter("embeddings.word_embeddings.weight").shape == (100, 64)
    assert pruned.get_parameter("encoder.layer.0.intermediate.dense.weight").shape == (64, 64)  # 128 units, half gone
