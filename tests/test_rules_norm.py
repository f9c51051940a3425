"""Table test for fxprune/rules/norm.py: BatchNorm, InstanceNorm, LayerNorm, RMSNorm, GroupNorm, PReLU."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import oracle_groups, run_oracle


class BatchNorms(nn.Module):
    """nn.BatchNorm2d, F.batch_norm with explicit buffers, and an affine InstanceNorm2d with running stats."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        y = F.batch_norm(self.conv2(y), self.mean, self.var, self.gamma, self.beta, False)
        y = torch.relu(self.inorm(self.conv3(torch.relu(y))))
        return self.head(y)


def test_batch_and_instance_norm_relations():
    dg = fxprune.analyze(BatchNorms().eval(), (torch.randn(2, 2, 3, 3),))
    a, b, c = dg.group_of("conv1.weight", 0), dg.group_of("conv2.weight", 0), dg.group_of("conv3.weight", 0)
    assert (a.units, b.units, c.units) == (4, 6, 4)
    for name in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert dg.group_of(name, 0) is a, name
    for name in ("mean", "var", "gamma", "beta"):
        assert dg.group_of(name, 0) is b, name
    for name in ("inorm.weight", "inorm.bias", "inorm.running_mean", "inorm.running_var"):
        assert dg.group_of(name, 0) is c, name
    kinds = {m.name: m.kind for m in a.members}
    assert kinds["bn.running_mean"] == "buffer" and kinds["bn.weight"] == "parameter"
    # batch norm uses running statistics in eval: per channel, so the oracle applies
    assert not a.normalized and not b.normalized
    assert ("bn.num_batches_tracked", 0) not in {(m.name, m.dim) for m in a.members}


def test_batch_and_instance_norm_prune_exactly():
    x = torch.randn(2, 2, 3, 3)
    dg, removal, pruned = run_oracle(BatchNorms(), (x,), absolute=True)
    a, b, c = dg.group_of("conv1.weight", 0), dg.group_of("conv2.weight", 0), dg.group_of("conv3.weight", 0)
    assert pruned.bn.num_features == 4 - len(removal[a])
    assert tuple(pruned.mean.shape) == tuple(pruned.gamma.shape) == (6 - len(removal[b]),)
    assert pruned.inorm.num_features == tuple(pruned.inorm.running_var.shape)[0] == 4 - len(removal[c])


class LayerNorms(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6) if kind == "ln" else nn.RMSNorm(6)
        self.w = nn.Parameter(torch.randn(6))
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        y = self.ln(self.fc1(x))
        y = F.layer_norm(y, (6,), self.w) if self.kind == "ln" else F.rms_norm(y, [6], self.w)
        return self.fc2(y)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_layer_norm_ties_affine_params_and_is_normalized(kind):
    dg = fxprune.analyze(LayerNorms(kind).eval(), (torch.randn(2, 5, 3),))
    h = dg.group_of("fc1.weight", 0)
    assert h.units == 6 and h.prunable and h.normalized
    for name in ["ln.weight", "w", "fc2.weight"] + (["ln.bias"] if kind == "ln" else []):
        assert dg.group_of(name, 0 if name != "fc2.weight" else 1) is h, name
    assert oracle_groups(dg) == []
    # the real op once: the normalized_shape argument and module attribute follow the pruned size
    x = torch.randn(2, 5, 3)
    pruned = fxprune.prune(LayerNorms(kind).eval(), 0.5, example_inputs=(x,))
    assert pruned(x).shape == (2, 5, 2)
    assert tuple(pruned.ln.normalized_shape) == (3,) and tuple(pruned.w.shape) == (3,)
    assert ("layer_norm(ln, (3,)" if kind == "ln" else "rms_norm(ln, [3]") in pruned.code


class GroupNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.gn(self.conv1(x))))


def test_group_norm_is_a_product_of_norm_groups_and_channels():
    dg = fxprune.analyze(GroupNorms().eval(), (torch.randn(1, 2, 3, 3),))
    ng, cg = dg.groups_of("conv1.weight", 0)
    assert (ng.units, cg.units) == (2, 4)
    for name, axis in (("gn.weight", 0), ("gn.bias", 0), ("conv2.weight", 1), ("gn", 1)):
        assert dg.groups_of(name, axis) == [ng, cg], name
    # statistics are over the channels of a group: removing a whole group is exact, a channel is not
    assert not ng.normalized and cg.normalized
    assert oracle_groups(dg) == [ng]
    x = torch.randn(1, 2, 3, 3)
    dg, removal, pruned = run_oracle(GroupNorms(), (x,), absolute=True)
    assert list(removal) == [dg.groups_of("conv1.weight", 0)[0]]
    assert pruned.gn.num_groups == 1 and pruned.gn.num_channels == 4 and pruned.conv1.out_channels == 4
    # the real op with channel pruning inside each group: runs, shapes kept
    pruned = fxprune.prune(GroupNorms().eval(), 0.5, example_inputs=(x,), round_to=1)
    assert pruned(x).shape == (1, 2, 3, 3)
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (1, 2)


class PRelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.act1 = nn.PReLU(5)
        self.fc2 = nn.Linear(5, 4)
        self.act2 = nn.PReLU()  # one shared slope
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_prelu_per_channel_slope():
    dg = fxprune.analyze(PRelus().eval(), (torch.randn(2, 3),))
    a, b = dg.group_of("fc1.weight", 0), dg.group_of("fc2.weight", 0)
    assert dg.group_of("act1.weight", 0) is a and a.units == 5
    assert dg.group_of("act2.weight", 0).units == 1  # the shared slope is not a channel axis
    assert sorted(g.units for g in dg.prunable_groups) == [4, 5]
    dg, removal, pruned = run_oracle(PRelus(), (torch.randn(2, 3),), absolute=True)
    assert pruned.act1.num_parameters == 5 - len(removal[dg.group_of("fc1.weight", 0)])
    assert pruned.act2.num_parameters == 1


def test_a_traced_parametrized_module_is_frozen_not_pruned_wrong():
    """A weight-normed nn.Linear is one call_module whose weight is computed from parametrizations.*: its module
    rule would resize the bias and the next layer but not the weight (the exported form is related op by op)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
            self.c = nn.Linear(5, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    x = torch.randn(2, 3)
    dg = fxprune.analyze(M().eval(), (x,))
    assert [n.name for n, _ in dg.state.unsupported] == ["b"]
    assert not dg.prunable_groups
    with pytest.warns(UserWarning, match="removed 0% .* no rule for this op"):
        assert fxprune.prune(M().eval(), 0.5, example_inputs=(x,))(x).shape == (2, 2)
