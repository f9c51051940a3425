"""Table test for fxprune/rules/reduction.py: sum/mean/max/amax/argmax/..., torch.max(a, b), norm."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import run_oracle


class SpatialReductions(nn.Module):
    """Reductions over H and W in method, function and keepdim forms; channels carry through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))  # (B, 6, H, W)
        a = y.mean((2, 3))
        b = torch.amax(y, dim=(-2, -1))
        c = y.sum(3).max(2)[0]  # a (values, indices) pair, then its values
        d = y.amin(3).amin(2)
        e = y.norm(2, (2, 3)) + torch.max(a, b)  # torch.max of two tensors is elementwise
        return self.fc(a + b + c + d + e)


def test_reduced_axes_disappear_and_others_carry_over():
    dg = fxprune.analyze(SpatialReductions().eval(), (torch.randn(2, 2, 3, 3),))
    ch = dg.group_of("conv.weight", 0)
    assert ch.units == 6 and ch.prunable and dg.group_of("fc.weight", 1) is ch
    for name in ("mean", "amax", "sum_1", "getitem", "amin", "amin_1", "norm", "max_2"):
        assert dg.group_of(name, 1) is ch, name
        assert dg.group_of(name, 0) is dg.group_of("x", 0), name
    # getitem is the values of max_1's (values, indices) pair: both carry the channel axis
    assert (("v", "max_1", (1,)), 1) in dg.layouts
    assert dg.solver.final_atoms(dg.layouts[(("v", "max_1", (1,)), 1)]) == [ch.atom]
    assert dg.layout_of("sum_1", 2).size(dg.solver) == 3 and dg.group_of("sum_1", 2) is dg.group_of("relu", 2)
    # the mean is over H and W (frozen spatial axes): the channel group is not normalized
    assert not ch.normalized and dg.group_of("relu", 2).normalized
    run_oracle(SpatialReductions(), (torch.randn(2, 2, 3, 3),), absolute=True)


class ChannelReductions(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.op == "sum":
            return y.sum(1, keepdim=True)
        if self.op == "amax":
            return torch.relu(y).amax(1)
        if self.op == "argmax":
            return y.argmax(dim=1).float()
        if self.op == "mean":
            return y.mean(1)
        return torch.var(y, 1)


@pytest.mark.parametrize("op,normalized", [("sum", False), ("amax", False), ("argmax", False), ("mean", True),
                                           ("var", True)])
def test_reduction_over_the_pruned_axis(op, normalized):
    x = torch.randn(2, 2, 3, 3)
    dg = fxprune.analyze(ChannelReductions(op).eval(), (x,))
    ch = dg.group_of("conv.weight", 0)
    assert ch.units == 4 and ch.prunable and ch.normalized is normalized
    # the output keeps H and W from the input, nothing from the channel axis
    out = dg.gm.graph.find_nodes(op="output")[0].args[0]
    last = out.meta["val"].ndim - 1
    assert dg.group_of(out.name, 0) is dg.group_of("x", 0)
    assert dg.group_of(out.name, last) is dg.group_of("conv", 3)
    assert ch not in [g for d in range(last + 1) for g in dg.groups_of(out.name, d)]
    if op in ("sum", "amax"):
        # a dead (zero, after relu for amax) channel adds nothing to a sum or max of non-negative values
        run_oracle(ChannelReductions(op), (x,), absolute=True)
    else:
        pruned = fxprune.prune(ChannelReductions(op).eval(), 0.5, example_inputs=(x,))
        assert pruned(x).shape == dg.gm(x).shape and pruned.conv.out_channels == 2


def test_full_reduction_relates_nothing():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x).sum()

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),))
    g = dg.group_of("fc.weight", 0)
    assert g.prunable and not g.normalized and g.units == 4
    assert [m.name for m in g.members if m.kind == "activation"] == ["fc"]
    run_oracle(M(), (torch.randn(2, 3),), absolute=True)


class PairwiseMaxAfterMatmul(nn.Module):
    """Two projections whose outputs meet only through ``torch.max(scores, floor)``: under torch.export that is
    ``aten.max.other``, elementwise; as a reduction its output's axes would relate to nothing and the two
    projections' units would fall into separate groups (XGLM's attention clamps its scores this way)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        scores = torch.max(self.a(x), torch.full((), -1.0))
        return self.out(scores * self.b(x))


def test_exported_pairwise_max_is_elementwise():
    from fxprune.testing import exported

    x = torch.randn(3, 4)
    gm = exported(PairwiseMaxAfterMatmul().eval(), x)
    assert any("max.other" in str(n.target) for n in gm.graph.nodes)
    dg, _, _ = run_oracle(gm, (x,), absolute=True)
    # a's and b's outputs meet in the product: one group of 6 units, not two
    groups = [g for g in dg.prunable_groups if g.units == 6]
    assert len(groups) == 1 and {"a.weight", "b.weight"} <= {p.name for p in groups[0].parameters}
