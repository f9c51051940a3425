"""Table test for fxprune/rules/conv.py: Conv1d/2d/3d, F.conv*, ConvTranspose*, any ``groups``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import group_ids, run_oracle
from tests.models import WorkedExample


def _units(dg, name, axis):
    return [g.units for g in dg.groups_of(name, axis)]


def test_grouped_conv_worked_example_groups():
    dg = fxprune.analyze(WorkedExample().eval(), (torch.randn(2, 3, 4, 4),))
    # conv2's groups split every member of the channel stream into (G: 2) x (per group: 4)
    assert _units(dg, "conv1.weight", 0) == [2, 4]
    g, c = dg.groups_of("conv1.weight", 0)
    for name, axis in [("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("bn1.running_mean", 0),
                       ("bn1.running_var", 0), ("conv2.weight", 0), ("conv2.bias", 0), ("conv1", 1), ("conv2", 1),
                       ("relu", 1), ("add", 1)]:
        assert group_ids(dg, name, axis) == [g.id, c.id], name
    # conv2's weight axis 1 (input channels per group) is exactly the per-group atom
    assert dg.group_of("conv2.weight", 1) is c
    # fc columns are (G x C x H x W); H and W are spatial and frozen
    fc = dg.groups_of("fc.weight", 1)
    assert [x.units for x in fc] == [2, 4, 4, 4]
    assert fc[0] is g and fc[1] is c
    assert all(x.frozen and "spatial axis" in x.frozen[0] for x in fc[2:])
    assert g.prunable and c.prunable and not g.normalized and not c.normalized
    # frozen: the input channel axis, the logits, the kernels
    assert "graph input" in dg.group_of("conv1.weight", 1).frozen[0]
    assert "graph output" in dg.group_of("fc.weight", 0).frozen[0]
    for d in (2, 3):
        assert "convolution kernel" in dg.group_of("conv2.weight", d).frozen[0]
        assert "conv2" in dg.group_of("conv2.weight", d).frozen[0]
    assert sorted(x.units for x in dg.prunable_groups) == [2, 4]


def test_grouped_conv_worked_example_prunes_exactly():
    x = torch.randn(2, 3, 4, 4)
    dg, removal, pruned = run_oracle(WorkedExample(), (x,), lambda dg: dg.groups_of("conv1.weight", 0),
                                     fraction=0.5, seed=1, absolute=True)
    g, c = dg.groups_of("conv1.weight", 0)
    assert [len(removal[g]), len(removal[c])] == [1, 2]
    # one conv group left with 2 channels: groups shrinks from 2 to 1
    assert pruned.conv2.groups == 1
    assert tuple(pruned.conv2.weight.shape) == (2, 2, 3, 3)
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels, pruned.bn1.num_features) == (2, 2, 2)
    assert tuple(pruned.fc.weight.shape) == (10, 2 * 16)


def test_removing_a_rank_keeps_every_conv_group():
    x = torch.randn(2, 3, 4, 4)
    _, _, pruned = run_oracle(WorkedExample(), (x,), lambda dg: dg.groups_of("conv1.weight", 0)[1:], fraction=0.25,
                              absolute=True)
    assert pruned.conv2.groups == 2
    assert tuple(pruned.conv2.weight.shape) == (6, 3, 3, 3)


class ConvTransposeChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 1)
        self.ct = nn.ConvTranspose2d(4, 6, 3, groups=2)
        self.c2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c2(self.ct(self.c1(x)))


def test_grouped_conv_transpose_relations():
    dg = fxprune.analyze(ConvTransposeChain().eval(), (torch.randn(1, 2, 4, 4),))
    # ConvTranspose weight is (in, out / groups, k, k): axis 0 is (G x in/G), axis 1 is out/G
    assert _units(dg, "ct.weight", 0) == [2, 2]
    assert _units(dg, "ct.weight", 1) == [3]
    g, cin = dg.groups_of("ct.weight", 0)
    cout = dg.group_of("ct.weight", 1)
    assert group_ids(dg, "c1.weight", 0) == [g.id, cin.id]
    assert group_ids(dg, "ct", 1) == [g.id, cout.id]
    assert group_ids(dg, "ct.bias", 0) == [g.id, cout.id]
    assert group_ids(dg, "c2.weight", 1) == [g.id, cout.id]
    assert dg.describe(dg.layout_of("c2.weight", 1)) == f"(G{g.id}(2) x G{cout.id}(3))"
    assert all(x.prunable for x in (g, cin, cout))


def test_grouped_conv_transpose_prunes_exactly():
    dg, removal, pruned = run_oracle(ConvTransposeChain(), (torch.randn(1, 2, 4, 4),), absolute=True)
    assert len(removal) == 3
    assert pruned.ct.groups == 1
    assert tuple(pruned.ct.weight.shape) == (1, 2, 3, 3)
    assert (pruned.ct.in_channels, pruned.ct.out_channels) == (1, 2)


class FunctionalConvs(nn.Module):
    """F.conv1d with explicit weights, and a grouped F.conv1d whose groups argument is positional."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 2, 3))
        self.b1 = nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 1, 3))  # depthwise
        self.w3 = nn.Parameter(torch.randn(3, 4, 1))

    def forward(self, x):
        y = F.conv1d(x, self.w1, self.b1, padding=1)
        y = F.conv1d(y, self.w2, None, 1, 1, 1, 4)
        return F.conv1d(y, self.w3)


def test_functional_and_depthwise_conv_relations():
    dg = fxprune.analyze(FunctionalConvs(), (torch.randn(2, 2, 5),))
    # depthwise: groups == channels, so the channel axis is (G: 4) with a per-group atom of 1 unit
    ch = dg.group_of("w1", 0)
    assert ch.units == 4 and ch.prunable
    for name, axis in [("b1", 0), ("w2", 0), ("w3", 1), ("conv1d", 1), ("conv1d_1", 1)]:
        assert dg.group_of(name, axis) is ch
    assert dg.layout_of("w2", 1).size(dg.solver) == 1
    assert "graph output" in dg.group_of("w3", 0).frozen[0]
    assert "graph input" in dg.group_of("w1", 1).frozen[0]
    assert "convolution kernel" in dg.group_of("w1", 2).frozen[0]


def test_functional_depthwise_conv_rewrites_groups_argument():
    x = torch.randn(2, 2, 5)
    dg, removal, pruned = run_oracle(FunctionalConvs(), (x,), absolute=True)
    (units,) = removal.values()
    kept = 4 - len(units)
    assert tuple(pruned.w1.shape) == (kept, 2, 3) and tuple(pruned.w2.shape) == (kept, 1, 3)
    node = next(n for n in pruned.graph.nodes if n.op == "call_function" and n.args[1].target == "w2")
    assert node.args[-1] == kept  # the positional groups argument follows the channel count


class Conv3dAndUnbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(2, 4, 1)
        self.b = nn.Conv3d(4, 2, 1)
        self.c = nn.Conv1d(3, 6, 1)
        self.d = nn.Conv1d(6, 3, 1)

    def forward(self, x, s):
        return self.b(torch.relu(self.a(x))), self.d(self.c(s))


def test_conv3d_and_unbatched_conv1d():
    x, s = torch.randn(1, 2, 2, 2, 2), torch.randn(3, 5)  # s is an unbatched (C, L) input
    model = Conv3dAndUnbatched().eval()
    dg, removal, pruned = run_oracle(model, (x, s), seed=2, prune_head_dims=False, absolute=True)
    assert dg.group_of("a.weight", 0) is dg.group_of("b.weight", 1)
    assert dg.group_of("a.weight", 0).units == 4
    assert dg.group_of("c.weight", 0) is dg.group_of("d.weight", 1) is dg.group_of("c", 0)
    assert "spatial axis" in dg.group_of("c", 1).frozen[0]
    assert sorted(g.units for g in dg.prunable_groups) == [4, 6]
    assert pruned.a.out_channels == 4 - len(removal[dg.group_of("a.weight", 0)])
    assert pruned.c.out_channels == 6 - len(removal[dg.group_of("c.weight", 0)])


def test_prune_ratio_grouped_conv_runs():
    x = torch.randn(2, 3, 4, 4)
    model = WorkedExample().eval()
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), round_to=1)
    assert pruned(x).shape == (2, 10)
    assert pruned.conv2.groups == 1 and pruned.conv2.out_channels == 2
