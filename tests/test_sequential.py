"""Sequential reconstruction (fxprune.calibration.sequential) and BatchNorm re-estimation
(fxprune.calibration.batchnorm): lower output error than the one-shot refit where pruning compounds, exact on a
planted redundancy, one pass over the batches per stage, running statistics computed by hand.

Checked: sequential against one-shot reconstruction (lower held-out error on a 3-layer MLP with both hidden groups
pruned; equal where only the first group loses a planted copy), the stages and one pass over the batches per stage,
in place and on CUDA; BatchNorm re-estimation against per-batch statistics taken by a hook.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.calibration import (plan_sequential, reconstruct, reconstruct_sequential, reestimate_batchnorm,
                                 stages_of)
from fxprune.testing import assert_close_to_scale, exported
from tests.models import MLP, Conv1D, plant_redundant_units, tanh_cnn


def _mlp3():
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).eval()


class TwoBranch(nn.Module):
    """Two consumers of one group side by side (one stage), and a consumer of both (the next stage)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.a, self.b, self.out = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.out(torch.tanh(self.a(h)) * torch.tanh(self.b(h)))


class CountingBatches(list):
    """A list of batches that counts the passes over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def _relative_error(got, expected) -> float:
    return ((got - expected).square().mean() / expected.square().mean()).item()


def _three_ways(model, calibration, held_out) -> tuple[dict, dict]:
    """Relative output errors on ``held_out`` and the pruned models (half of every group, ``round_to=1``): no
    refit, one-shot reconstruction, sequential reconstruction."""
    errors, pruned = {}, {}
    with torch.no_grad():
        expected = model(held_out)
        for name, options in [("none", {}), ("one-shot", dict(reconstruct=True)),
                              ("sequential", dict(reconstruct=True, sequential=True))]:
            pruned[name] = fxprune.prune(model, 0.5, example_inputs=(held_out[:2],), round_to=1,
                                         calibration=calibration, **options)
            errors[name] = _relative_error(pruned[name](held_out), expected)
    return errors, pruned


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sequential_beats_one_shot_where_pruning_compounds(seed, kind):
    """Consecutive pruned groups: the later consumers' inputs changed, which only the sequential refit sees.

    On the 3-layer MLP sequential was 2-6% below one-shot on 20 seeds (worst 1.7%); on the CNN (three
    stages, tanh) it is no better in general (from 5% below to 6% above on 20 seeds), so there both refits
    must only beat plain pruning, and sequential stay within 10% of one-shot.
    """
    torch.manual_seed(seed)
    model, shape = (_mlp3(), (8,)) if kind == "mlp" else (tanh_cnn().eval(), (2, 6, 6))
    calibration = [torch.randn(64, *shape) for _ in range(8)]
    held_out = torch.randn(256, *shape)
    errors, pruned = _three_ways(model, calibration, held_out)
    pruned = pruned["sequential"]
    if kind == "mlp":
        assert errors["sequential"] < 0.99 * errors["one-shot"] < 0.1 * errors["none"], errors
    else:
        assert errors["sequential"] < 1.1 * errors["one-shot"] < 0.8 * errors["none"], errors
    assert fxprune.plan_of(pruned).settings["sequential"] is True


def test_sequential_equals_one_shot_when_only_the_first_group_is_pruned():
    """A planted copy in the first group, nothing pruned later: both refits move its column onto the copy."""
    torch.manual_seed(0)
    model = MLP(4, 8, 3, act=nn.GELU).eval()
    plant_redundant_units(model, {2: 5, 6: None})
    model = nn.Sequential(model, nn.Tanh(), nn.Linear(3, 2)).eval()  # a later consumer (of a group left whole)
    x = torch.randn(2, 4)
    dg = fxprune.analyze(model, (x,))
    removal = {dg.group_of("0.fc1.weight", 0): [2, 6]}
    batches = [torch.randn(32, 4) for _ in range(4)]
    test = torch.randn(64, 4)
    with torch.no_grad():
        one_shot, sequential = fxprune.apply(dg, removal), fxprune.apply(dg, removal)
        assert reconstruct(dg, removal, one_shot, batches, damping=1e-9) == ["0.fc2.weight", "0.fc2.bias"]
        assert reconstruct_sequential(dg, removal, sequential, batches, damping=1e-9) == ["0.fc2.weight",
                                                                                          "0.fc2.bias"]
        assert_close_to_scale(sequential(test), one_shot(test), atol=1e-5)
        assert_close_to_scale(sequential(test), model(test), atol=1e-4)


def test_stages_and_one_pass_per_stage():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(2, 6)
    dg = fxprune.analyze(model, (x,))
    removal = {g: [0, 3] for g in dg.prunable_groups}
    plan = plan_sequential(dg, removal)
    stages = stages_of(plan.original, plan.consumers)
    assert [sorted(s) for s in stages] == [["a.weight", "b.weight"], ["out.weight"]]
    mlp = fxprune.analyze(_mlp3(), (torch.randn(2, 8),))
    plan = plan_sequential(mlp, {g: [1] for g in mlp.prunable_groups})
    assert stages_of(plan.original, plan.consumers) == [["2.weight"], ["4.weight"]]
    batches = CountingBatches(torch.randn(16, 6) for _ in range(3))
    pruned = fxprune.apply(dg, removal)
    refit = reconstruct_sequential(dg, removal, pruned, batches)
    assert sorted(refit) == sorted(f"{m}.{p}" for m in ("a", "b", "out") for p in ("weight", "bias"))
    assert batches.passes == len(stages) == 2


def test_sequential_needs_reconstruct_and_a_reusable_list():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="reconstruct=True"):
        fxprune.prune(MLP(), 0.5, example_inputs=(x,), calibration=[x], sequential=True)
    with pytest.raises(ValueError, match="calibration"):
        fxprune.prune(MLP(), 0.5, example_inputs=(x,), reestimate_bn=True)
    dg = fxprune.analyze(MLP(3, 6, 2).eval(), (x,))
    removal = {dg.prunable_groups[0]: [0, 1]}
    with pytest.raises(ValueError, match="not an iterator"):
        reconstruct_sequential(dg, removal, fxprune.apply(dg, removal), (b for b in [x]))
    dropping = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 2)).train()
    dg = fxprune.analyze(dropping, (x,))
    removal = {dg.prunable_groups[0]: [0, 1]}
    with pytest.warns(UserWarning, match="dropout in training mode"):
        reconstruct_sequential(dg, removal, fxprune.apply(dg, removal), [x])
    # prune reads a generator once and keeps the batches for every stage
    pruned = fxprune.prune(_mlp3(), 0.5, example_inputs=(torch.randn(2, 8),), round_to=1, reconstruct=True,
                           sequential=True, calibration=(torch.randn(16, 8) for _ in range(3)))
    assert pruned.get_submodule("2").in_features == 16


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_sequential_in_place_and_on_device(device):
    """In place (the original graph is copied before rewriting edits it) equals a copy; CUDA batches work."""
    torch.manual_seed(0)
    model = tanh_cnn().eval().to(device)
    batches = [torch.randn(16, 2, 6, 6, device=device) for _ in range(3)]
    x = torch.randn(8, 2, 6, 6, device=device)
    options = dict(example_inputs=(x[:2],), calibration=batches, reconstruct=True, sequential=True, round_to=1,
                   reestimate_bn=True)
    pruned = fxprune.prune(model, 0.5, **options)
    with torch.no_grad():
        expected = pruned(x)
        in_place = fxprune.prune(copy.deepcopy(model), 0.5, inplace=True, **options)
        fxprune.testing.assert_same_outputs(in_place(x), expected)


def _by_hand(module, model, batches):
    """Mean of the per-batch means and of the per-batch unbiased variances of ``module``'s input."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    dims = [0, 2, 3] if seen[0].ndim == 4 else [0]
    mean = torch.stack([s.mean(dims) for s in seen]).mean(0)
    var = torch.stack([s.var(dims, unbiased=True) for s in seen]).mean(0)
    return mean, var


def test_reestimate_batchnorm_equals_batch_statistics_by_hand():
    torch.manual_seed(0)
    model = tanh_cnn().eval()
    with torch.no_grad():  # statistics of some other data: stale after pruning
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    batches = [torch.randn(16, 2, 6, 6) for _ in range(4)]
    pruned = fxprune.prune(model, 0.5, example_inputs=(batches[0][:2],), round_to=1)
    bn = pruned.get_submodule("1")
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    mean, var = _by_hand(bn, pruned, batches)  # eval mode: the BN input does not depend on its statistics
    result = reestimate_batchnorm(pruned, batches)
    new = result.get_submodule("1")
    torch.testing.assert_close(new.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.running_var, var, rtol=1e-5, atol=1e-6)
    assert int(new.num_batches_tracked) == len(batches)
    assert not new.training and new.momentum == 0.1 and not result.training  # modes and momentum put back
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])  # not inplace
    assert int(bn.num_batches_tracked) == before[2]
    assert reestimate_batchnorm(pruned, batches, inplace=True) is pruned
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    through_prune = fxprune.prune(model, 0.5, example_inputs=(batches[0][:2],), round_to=1, calibration=batches,
                                  reestimate_bn=True)
    torch.testing.assert_close(through_prune.get_submodule("1").running_mean, mean, rtol=1e-5, atol=1e-6)
    assert fxprune.plan_of(through_prune).settings["reestimate_bn"] is True


def test_reestimate_batchnorm_refuses_functional_batch_norm_and_warns_without_any():
    torch.manual_seed(0)
    model = tanh_cnn().eval()
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(NotImplementedError, match="symbolic_trace"):
        reestimate_batchnorm(exported(model, x), [x])
    with pytest.warns(UserWarning, match="no BatchNorm"):
        reestimate_batchnorm(MLP(), [torch.randn(2, 3)])


def test_sequential_on_an_exported_graph_equals_the_traced_one():
    """aten.linear / aten.conv2d consumers are found in the pruned exported graph by weight name too."""
    torch.manual_seed(0)
    model = tanh_cnn().eval()
    batches = [torch.randn(16, 2, 6, 6) for _ in range(3)]
    x = torch.randn(8, 2, 6, 6)
    options = dict(example_inputs=(x[:2],), calibration=batches, reconstruct=True, sequential=True, round_to=1)
    with torch.no_grad():
        fxprune.testing.assert_same_outputs(fxprune.prune(exported(model, x[:2]), 0.5, **options)(x),
                                            fxprune.prune(model, 0.5, **options)(x))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.att = nn.Linear(8, 16), nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(self.att(h, h, h, need_weights=False)[0])))


def test_a_consumer_inside_a_recomposed_module_keeps_its_one_shot_refit():
    torch.manual_seed(0)
    model = Attention().eval()
    batches = [torch.randn(4, 5, 8) for _ in range(3)]
    dg = fxprune.analyze(model, (batches[0],))
    removal = {g: [0] if g.units == 4 else [0, 3, 5] for g in dg.prunable_groups}
    one_shot, sequential = fxprune.apply(dg, removal), fxprune.apply(dg, removal)
    assert "att.out_proj.weight" in reconstruct(dg, removal, one_shot, batches)
    reconstruct(dg, removal, sequential, batches)
    plan = plan_sequential(dg, removal)
    assert "att.out_proj.weight" in plan.consumers  # a call in the (decomposed) original graph
    refit = reconstruct_sequential(dg, removal, sequential, batches, damping=1e-4)  # fixed: always refit again
    assert sorted(refit) == ["fc2.bias", "fc2.weight", "fc3.bias", "fc3.weight"]
    assert isinstance(sequential.get_submodule("att"), nn.MultiheadAttention)
    assert torch.equal(sequential.get_parameter("att.out_proj.weight"), one_shot.get_parameter("att.out_proj.weight"))
    assert not torch.equal(sequential.get_parameter("fc3.weight"), one_shot.get_parameter("fc3.weight"))


def test_sequential_refits_weight_operand_consumers():
    """GPT-2-style ``addmm(b, x, W)`` consumers (weight stored (in, out)) are refit in their own layout."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 32), nn.Tanh(), Conv1D(32, 32), nn.Tanh(), Conv1D(32, 4)).eval()
    calibration = [torch.randn(64, 8) for _ in range(8)]
    held_out = torch.randn(256, 8)
    errors, pruned = _three_ways(model, calibration, held_out)
    weights = {name: m.get_parameter("4.weight") for name, m in pruned.items()}
    assert weights["sequential"].shape == (16, 4)
    assert not torch.allclose(weights["sequential"], weights["one-shot"])  # the last layer was refit again
    assert errors["sequential"] < 1.05 * errors["one-shot"] < 0.5 * errors["none"], errors
