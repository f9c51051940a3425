"""Importance criteria: each ranking checked against values computed by hand on a tiny model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.importance import (FPGM, LAMP, BNScale, Hessian, Magnitude, Random, Taylor, resolve_importance,
                                score_groups, unit_matrix)
from tests.models import bn_mlp, fixed_mlp


def hidden_scores(criterion, model=None):
    model = model or fixed_mlp()
    dg = fxprune.analyze(model, (torch.randn(2, 3),))
    (group,) = dg.prunable_groups
    return score_groups(resolve_importance(criterion), dg, [group]).get(group)


# per member, unit u: fc1.weight row u, fc1.bias[u], fc2.weight column u
L2_PER_MEMBER = np.array([[1, 4, 9, 3], [0.25, 0, 0, 0], [1, 1, 0, 4]])
L1_PER_MEMBER = np.array([[1, 2, 3, 3], [0.5, 0, 0, 0], [1, 1, 0, 2]])


def test_l2_is_the_sum_over_members_of_squared_slice_norms():
    np.testing.assert_allclose(hidden_scores("l2"), [2.25, 5, 9, 7])
    np.testing.assert_allclose(hidden_scores("l1"), [2.5, 3, 3, 5])


@pytest.mark.parametrize("reduction, expected", [
    ("sum", L2_PER_MEMBER.sum(0)), ("mean", L2_PER_MEMBER.mean(0)), ("max", [1, 4, 9, 4]), ("prod", [0.25, 0, 0, 0])])
def test_reductions_combine_members(reduction, expected):
    np.testing.assert_allclose(hidden_scores(Magnitude(2, reduction=reduction)), expected)


@pytest.mark.parametrize("normalizer, expected", [
    ("mean", np.array([2.25, 5, 9, 7]) / 5.8125),
    ("max", np.array([2.25, 5, 9, 7]) / 9),
    ("sum", np.array([2.25, 5, 9, 7]) / 23.25),
    ("standardization", (np.array([2.25, 5, 9, 7]) - 5.8125) / np.std([2.25, 5, 9, 7])),
])
def test_normalizers(normalizer, expected):
    np.testing.assert_allclose(hidden_scores(Magnitude(2, normalizer=normalizer)), expected)


def test_lamp_divides_by_the_sum_of_scores_not_ranked_below():
    # sorted: 2.25 (u0), 5 (u1), 7 (u3), 9 (u2); tails 23.25, 21, 16, 9
    np.testing.assert_allclose(hidden_scores(LAMP()), [2.25 / 23.25, 5 / 21, 9 / 9, 7 / 16])
    np.testing.assert_allclose(hidden_scores("lamp"), [2.25 / 23.25, 5 / 21, 1, 7 / 16])


def test_fpgm_sums_distances_to_the_other_units_per_member():
    rows = {"fc1.weight": [[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], "fc1.bias": [[0.5], [0], [0], [0]],
            "fc2.weight": [[1, 0], [0, 1], [0, 0], [2, 0]]}
    expected = np.zeros(4)
    for vectors in rows.values():
        for u in range(4):
            expected[u] += sum(math.dist(vectors[u], vectors[v]) for v in range(4))
    np.testing.assert_allclose(hidden_scores(FPGM()), expected)
    np.testing.assert_allclose(hidden_scores("fpgm"), expected)


def test_random_is_reproducible_and_seeded():
    a, b, c = hidden_scores(Random(0)), hidden_scores(Random(0)), hidden_scores(Random(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.shape == (4,) and ((0 <= a) & (a < 1)).all()


def test_bn_scale_is_abs_gamma_and_skips_groups_without_batchnorm():
    model = bn_mlp([0.1, -2.0, 0.5, 1.0])
    dg = fxprune.analyze(model, (torch.randn(2, 3),))
    scores = score_groups(BNScale(), dg, dg.prunable_groups)
    assert len(dg.prunable_groups) == 2 and len(scores) == 1  # the 5-unit group has no BatchNorm
    (group, values), = scores.items()
    assert group.units == 4
    np.testing.assert_allclose(values, [0.1, 2.0, 0.5, 1.0], rtol=1e-6)
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 3),), importance="slimming")
    torch.testing.assert_close(pruned.get_submodule("1").weight, torch.tensor([-2.0, 1.0]))
    assert pruned.get_submodule("3").out_features == 5  # not pruned: no opinion on it


def gradient_setup(batches):
    model = fixed_mlp()
    loss_fn = lambda m, batch: (m(batch) ** 2).sum()  # noqa: E731
    grads, squares = [], []
    for batch in batches:  # independent reference: plain autograd on a copy
        reference = copy.deepcopy(model)
        loss_fn(reference, batch).backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    mean = {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}
    squares = {n: sum(g[n] ** 2 for g in grads) / len(grads) for n in grads[0]}
    return model, loss_fn, mean, squares


def per_unit(model, fn):
    """sum over fc1.weight row u, fc1.bias[u], fc2.weight column u of fn(name, weight, index)."""
    w = dict(model.named_parameters())
    return np.array([float(fn("0.weight", w["0.weight"])[u].sum() + fn("0.bias", w["0.bias"])[u].sum()
                           + fn("2.weight", w["2.weight"])[:, u].sum()) for u in range(4)])


BATCHES = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])]


def test_taylor_is_abs_weight_times_mean_gradient():
    model, loss_fn, mean, _ = gradient_setup(BATCHES)
    expected = per_unit(model, lambda n, w: (w * mean[n]).abs().detach())
    got = hidden_scores(Taylor(BATCHES, loss_fn), model)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    multivariate = np.abs(per_unit(model, lambda n, w: (w * mean[n]).detach()))
    np.testing.assert_allclose(hidden_scores(Taylor(BATCHES, loss_fn, multivariate=True), model), multivariate,
                               rtol=1e-5)


def test_hessian_is_half_weight_squared_times_mean_squared_gradient():
    model, loss_fn, _, squares = gradient_setup(BATCHES)
    expected = per_unit(model, lambda n, w: (0.5 * w ** 2 * squares[n]).detach())
    np.testing.assert_allclose(hidden_scores(Hessian(BATCHES, loss_fn), model), expected, rtol=1e-5)
    assert not np.allclose(expected, per_unit(model, lambda n, w: (0.5 * w ** 2 * _mean_sq(n)).detach()))


def _mean_sq(name):  # the square of the mean gradient, which OBD must not use
    _, _, mean, _ = gradient_setup(BATCHES)
    return mean[name] ** 2


def test_calibration_leaves_the_model_as_it_was():
    model = bn_mlp([1.0, 1.0, 1.0, 1.0]).train()
    model[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(4, 3),), importance="taylor", calibration=data)
    assert pruned.get_submodule("0").out_features == 2
    # running statistics restored; num_batches_tracked is left out: shape propagation itself (not calibration)
    # increments it on a model in training mode (reported separately)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if "num_batches" not in k)
    assert all(p.grad is None for p in model.parameters())
    assert model[0].weight.requires_grad is False and model.training


def test_gradient_criteria_need_data():
    with pytest.raises(ValueError, match="calibration"):
        fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),), importance="hessian")
    with pytest.raises(ValueError, match="empty"):
        fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),), importance=Taylor([]))


def test_user_callable_gets_slice_matrices_per_member():
    seen = {}

    def by_first_member(group, weights):
        seen.update({k: tuple(v.shape) for k, v in weights.items()})
        return weights["0.weight[0]"].abs().sum(1)  # 1, 2, 3, 3

    pruned = fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),), importance=by_first_member)
    assert seen == {"0.weight[0]": (4, 3), "0.bias[0]": (4, 1), "2.weight[1]": (4, 2)}
    torch.testing.assert_close(pruned.get_submodule("0").weight, fixed_mlp()[0].weight[2:])
    legacy = fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),),
                           importance=lambda dg, group, tensors: -np.arange(group.units))  # last units lowest
    torch.testing.assert_close(legacy.get_submodule("0").weight, fixed_mlp()[0].weight[:2])


def test_bad_importance_results_and_names_are_clear_errors():
    with pytest.raises(ValueError, match="returned 3 scores for group G.*4 units"):
        fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),), importance=lambda g, w: [1, 2, 3])
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        fxprune.prune(fixed_mlp(), 0.5, example_inputs=(torch.randn(2, 3),), importance="l3")
    with pytest.raises(ValueError, match="unknown reduction"):
        Magnitude(2, reduction="median")


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.fc = nn.Linear(3 * 2 * 2, 2, bias=False)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_flatten_slices_take_every_spatial_column_of_a_channel():
    model = FlattenHead()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
        model.fc.weight.copy_(torch.arange(24.0).view(2, 12))
    dg = fxprune.analyze(model, (torch.randn(1, 1, 2, 2),))
    (group,) = dg.prunable_groups
    fc = next(m for m in group.parameters if m.name == "fc.weight")
    matrix = unit_matrix(group, fc, model.fc.weight)
    torch.testing.assert_close(matrix[1], model.fc.weight[:, 4:8].T.reshape(-1))  # channel 1: columns 4..7
    expected = [c ** 2 + float((model.fc.weight[:, 4 * i:4 * i + 4] ** 2).sum()) for i, c in enumerate([1, 2, 3])]
    np.testing.assert_allclose(hidden_scores_of(dg, group), expected, rtol=1e-6)


def hidden_scores_of(dg, group):
    return score_groups(Magnitude(2), dg, [group])[group]
