"""Table test for fxprune/rules/elementwise.py: arithmetic, activations, GLU, softmax, F.normalize."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import plant_dead_units, run_oracle


class Forms(nn.Module):
    """The same channel stream through module, function and method forms, a broadcast bias and a residual."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.GELU()
        self.bias = nn.Parameter(torch.randn(1, 6))
        self.scale = nn.Parameter(torch.randn(6))
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x):
        y = self.act(self.fc1(x))           # module
        y = F.silu(y) + self.bias           # function + broadcast (1, C) parameter
        y = y.relu() * self.scale           # method + (C,) parameter
        y = torch.tanh(y).clamp(-1, 1)
        z = self.fc2(y)
        y = torch.sigmoid(z) * 2 - 1 + y    # residual add ties fc2's output to fc1's
        return self.fc3(nn.functional.dropout(y, 0.1, training=False))


def test_forms_share_one_group_and_broadcast_axes_are_unrelated():
    dg = fxprune.analyze(Forms().eval(), (torch.randn(2, 4),))
    g = dg.group_of("fc1.weight", 0)
    assert g.units == 6 and g.prunable and not g.normalized
    for name, axis in [("fc1.bias", 0), ("act", 1), ("silu", 1), ("bias", 1), ("add", 1), ("relu", 1),
                       ("scale", 0), ("mul", 1), ("tanh", 1), ("clamp", 1), ("fc2.weight", 0), ("fc2.weight", 1),
                       ("fc2.bias", 0), ("sigmoid", 1), ("fc3.weight", 1), ("dropout", 1)]:
        assert dg.group_of(name, axis) is g, (name, axis)
    # the size-1 axis of bias broadcasts: no relation mentions it, so it never changes
    assert ("p", "bias") in dg.state.shapes
    assert (("p", "bias"), 0) not in dg.layouts
    # the batch axis of x carries through every elementwise op to the output, which freezes it
    assert dg.group_of("x", 0) is dg.group_of("fc3", 0)
    assert [x.units for x in dg.prunable_groups] == [6]


def test_forms_prune_exactly():
    dg, removal, pruned = run_oracle(Forms(), (torch.randn(2, 4),), absolute=True)
    (units,) = removal.values()
    assert tuple(pruned.bias.shape) == (1, 6 - len(units))
    assert tuple(pruned.scale.shape) == (6 - len(units),)
    assert pruned.fc2.in_features == pruned.fc2.out_features == pruned.fc1.out_features == 6 - len(units)


class Broadcast4d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.gain = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        y = torch.where(y > 0, y, y * 0.1)  # where with a computed condition
        y = torch.maximum(y * self.gain, torch.zeros_like(y))
        return self.head(y.masked_fill(y > 5, 5.0))


def test_broadcast_channel_parameter_4d():
    dg = fxprune.analyze(Broadcast4d().eval(), (torch.randn(1, 2, 3, 3),))
    g = dg.group_of("conv.weight", 0)
    assert g.units == 4
    assert dg.group_of("gain", 1) is g
    assert dg.group_of("where", 1) is g and dg.group_of("zeros_like", 1) is g
    assert dg.group_of("gt", 1) is g  # the boolean condition has the same channel axis
    assert dg.group_of("head.weight", 1) is g
    assert [d for d in range(4) if (("p", "gain"), d) in dg.layouts] == [0, 1]  # the batch axis is 1 == 1
    assert dg.state.unsupported == []  # comparisons have a rule
    run_oracle(Broadcast4d(), (torch.randn(1, 2, 3, 3),), absolute=True)


class Glu(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.up = nn.Linear(3, 8)
        self.glu = nn.GLU(-1) if module else None
        self.down = nn.Linear(4, 3)

    def forward(self, x):
        y = self.up(x)
        return self.down(self.glu(y) if self.glu is not None else F.glu(y, dim=-1))


@pytest.mark.parametrize("module", [True, False])
def test_glu_ties_the_two_halves(module):
    dg = fxprune.analyze(Glu(module).eval(), (torch.randn(2, 3),))
    g = dg.group_of("down.weight", 1)
    assert g.units == 4 and g.prunable
    # the up projection is (a ++ b) and a, b are the same group: unit u is rows u and u + 4
    assert dg.describe(dg.layout_of("up.weight", 0)) == f"(G{g.id}(4) ++ G{g.id}(4))"
    assert dg.groups_of("up.bias", 0) == [g]
    member = next(m for m in g.members if m.name == "up.weight" and m.dim == 0)
    assert member.indices(g, [1]).tolist() == [1, 5]
    dg, removal, pruned = run_oracle(Glu(module), (torch.randn(2, 3),), absolute=True)
    (units,) = removal.values()
    assert tuple(pruned.up.weight.shape) == (2 * (4 - len(units)), 3)


class SoftmaxOver(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(3, 6)
        self.sm = nn.Softmax(dim=-1)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc1(x)
        if self.kind == "module":
            y = self.sm(y)
        elif self.kind == "function":
            y = F.log_softmax(y, dim=1)
        elif self.kind == "method":
            y = y.softmax(-1)
        else:
            y = F.normalize(y, dim=1)
        return self.fc2(y)


@pytest.mark.parametrize("kind", ["module", "function", "method", "normalize"])
def test_normalising_ops_flag_their_axis(kind):
    dg = fxprune.analyze(SoftmaxOver(kind).eval(), (torch.randn(2, 3),))
    g = dg.group_of("fc1.weight", 0)
    assert g is dg.group_of("fc2.weight", 1)
    assert g.prunable and g.normalized  # prunable, but the dead-unit oracle does not apply
    assert fxprune.testing.oracle_groups(dg) == []
    # the real op still runs after pruning at a ratio
    x = torch.randn(2, 3)
    pruned = fxprune.prune(SoftmaxOver(kind).eval(), 0.5, example_inputs=(x,))
    assert pruned(x).shape == (2, 3)
    assert pruned.fc1.out_features == 3


def test_softmax_over_another_axis_is_not_normalized():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 6)
            self.fc2 = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.softmax(self.fc1(x), dim=0))

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),))
    assert not dg.group_of("fc1.weight", 0).normalized
    assert dg.group_of("x", 0).normalized
    run_oracle(M(), (torch.randn(2, 3),), absolute=True)


def test_in_place_methods_and_operators():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            y = self.fc1(x)
            y = y.clone()
            y = y.mul_(2.0)  # (assigned: rewrite's dead-code pass drops unused in-place results)
            y = y.add_(y).clamp_(min=-3.0)  # (adding a constant would make a dead unit live)
            y = -y
            y = y ** 2
            return self.fc2(y.contiguous().float()), x.type_as(y)

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),))
    g = dg.group_of("fc1.weight", 0)
    for name in ("clone", "mul_", "add_", "clamp_", "neg", "pow_1", "contiguous", "float_1"):
        assert dg.group_of(name, 1) is g, name
    assert dg.group_of("fc2.weight", 1) is g
    # x.type_as(y) takes only y's dtype: y's axes are not x's (here 3 vs 5, batch 2 vs 2)
    assert dg.group_of("type_as", 1) is dg.group_of("x", 1)
    model, x = M().eval(), torch.randn(2, 3)
    dg = fxprune.analyze(model, (x,))
    removal = plant_dead_units(dg, seed=0)
    before = dg.gm(x)
    pruned = fxprune.apply(dg, removal)
    after = pruned(x)
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)
    assert pruned.fc1.out_features == 5 - len(removal[dg.group_of("fc1.weight", 0)])


def test_type_as_does_not_tie_the_dtype_donor():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.head_a = nn.Linear(4, 2)
            self.head_b = nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            z = self.b(x).type_as(y).to(y)  # same sizes as y, but only y's dtype is used
            return self.head_a(torch.relu(y)), self.head_b(z)

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 4),))
    a, b = dg.group_of("a.weight", 0), dg.group_of("b.weight", 0)
    assert a is not b and a.prunable and b.prunable
    assert dg.group_of("head_a.weight", 1) is a
    assert dg.group_of("type_as", 1) is dg.group_of("to", 1) is dg.group_of("head_b.weight", 1) is b


def test_comparisons_and_logic_keep_their_operands_axes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            y = self.fc1(x)
            keep = (y > 0) & ~torch.isnan(y) | y.eq(1.0)
            return self.fc2(torch.where(keep, y, torch.zeros_like(y)).masked_fill(y.lt(-5), 0.0))

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),))
    assert dg.state.unsupported == []
    g = dg.group_of("fc1.weight", 0)
    assert g.prunable and g.units == 6
    for name in ("gt", "isnan", "invert", "and_", "eq", "or_", "lt", "where", "masked_fill"):
        assert dg.group_of(name, 1) is g, name
    run_oracle(M(), (torch.randn(2, 3),), absolute=True)


class Triangular(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)

    def forward(self, x):  # x: (B, 6, 4): channels become the masked square's rows, features its columns
        h = self.a(x)  # (B, 6, 6)
        return self.b(torch.triu(h) + torch.tril(h, -1).transpose(1, 2))


@pytest.mark.parametrize("export", [False, True])
def test_triu_and_tril_freeze_their_last_two_axes(export):
    model, x = Triangular().eval(), torch.randn(2, 6, 4)
    gm = fxprune.testing.exported(model, x) if export else model
    dg = fxprune.analyze(gm, (x,))
    assert not dg.state.unsupported
    frozen = dg.group_of("a.weight", 0)
    assert frozen.frozen and any("triu/tril" in why for why in frozen.frozen)
