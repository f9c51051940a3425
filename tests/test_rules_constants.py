"""Table test for fxprune/rules/constants.py: arange with literal bounds sliced at rewrite, constant index positions,
and broadcast_to (a shared key head broadcast to the query heads).

Checked: head 0 of four pruned keeps the others' arange-computed slopes, two layers sharing the slopes lose
different heads, a constant index moved, run-time positions frozen.
"""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.training.masking import zero_units
from fxprune.testing import assert_close_to_scale, exported


class Slopes(nn.Module):
    """Four heads of four, each scaled by its own ALiBi-like slope ``0.5 ** arange(1, 5)`` (computed in forward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 4, 4)
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, 5))
        return self.b((h * slopes[:, None]).flatten(1))


@pytest.mark.parametrize("capture", ["trace", "export"])
def test_arange_with_literal_bounds_keeps_each_kept_units_values(capture):
    """Pruning head 0 must leave heads 1-3 their own slopes (0.25, 0.125, 0.0625): rewriting the bounds to
    ``arange(1, 4)`` instead would hand them 0.5, 0.25, 0.125. (symbolic_trace evaluates ``arange(1, 5)`` while
    tracing: a tensor constant, sliced like a parameter; export keeps the call, which the rule slices.)"""
    torch.manual_seed(0)
    model, x = Slopes().eval(), torch.randn(3, 8)
    model = exported(model, x) if capture == "export" else model
    dg = fxprune.analyze(model, (x,))
    heads = next(g for g in dg.groups_of("a.weight", 0) if g.units == 4)
    assert heads.prunable, dg.report()
    removal = {heads: [0]}
    zero_units(dg, removal)
    with torch.no_grad():
        expected = dg.gm(x)
        pruned = fxprune.apply(dg, removal)
        assert_close_to_scale(pruned(x), expected)
    batch = 5 if capture == "trace" else 3  # testing.exported is a static capture
    assert pruned(torch.randn(batch, 8)).shape == (batch, 8)
    assert "aten.arange" not in pruned.code and "torch.arange" not in pruned.code  # the kept slopes: a buffer
    assert not any("_fxprune_" in name for name in pruned.state_dict())  # not a weight


class SharedSlopes(nn.Module):
    """Two layers of four heads reading one slopes tensor, computed once (as BLOOM's ALiBi)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, 5))[:, None]
        h = self.b((self.a(x).view(x.shape[0], 4, 4) * slopes).flatten(1))
        return self.d((self.c(h).view(x.shape[0], 4, 4) * slopes).flatten(1))


def test_layers_sharing_computed_slopes_lose_heads_of_their_own():
    """Each layer reads its own copy of the slopes (fxprune.analysis.untie), so layer 1 may lose head 0 and layer 2 head 3."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    gm = exported(SharedSlopes().eval(), x)
    dg = fxprune.analyze(gm, (x,))
    first, second = (next(g for g in dg.groups_of(name, 0) if g.units == 4) for name in ("a.weight", "c.weight"))
    assert first is not second and first.prunable and second.prunable, dg.report()
    removal = {first: [0], second: [3]}
    zero_units(dg, removal)
    with torch.no_grad():
        expected = dg.gm(x)
        assert_close_to_scale(fxprune.apply(dg, removal)(x), expected)
    assert gm.code.count("aten.arange") == 1 and dg.gm.code.count("aten.arange") == 2  # the caller's graph kept


class RunTimePositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):  # (B, N, 4): positions over the sequence, read at run time
        return self.a(x) + torch.arange(x.shape[1])[:, None]


def test_arange_over_a_run_time_size_stays_frozen():
    x = torch.randn(2, 5, 4)
    dg = fxprune.analyze(RunTimePositions().eval(), (x,))
    positions = dg.groups_of_layout(dg.layout_of("arange", 0))
    if "aten.arange.default(5" in dg.gm.code:  # a static export (torch < 2.7) baked the length in: the positions
        # are frozen with the sequence axis they are added to
        assert all(g.frozen for g in positions)
        return
    assert all(any("positions from torch.arange" in r for r in g.frozen) for g in positions)


class SharedKey(nn.Module):
    """q heads then one shared k head in one projection, as Falcon's multi-query attention: ``qkv[:, :, [4]]``
    (a positive index, which must move when a q head before it goes) broadcast to the q heads."""

    def __init__(self, picked):
        super().__init__()
        self.picked = picked
        self.qk, self.o = nn.Linear(8, 5 * 4 + 4), nn.Linear(16, 8)

    def forward(self, x):
        y = self.qk(x).view(x.shape[0], 6, 4)
        q, k = y[:, :4], y[:, [self.picked]]
        return self.o((q * torch.broadcast_to(k, q.shape)).flatten(1))


@pytest.mark.parametrize("picked", [4, -2])
def test_a_constant_index_is_a_unit_of_its_own_and_moves(picked):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    gm = exported(SharedKey(picked).eval(), x)
    dg = fxprune.analyze(gm, (x,))
    assert not dg.state.unsupported
    heads = next(g for g in dg.groups_of("qk.weight", 0) if g.units == 4 and g.prunable)
    removal = {heads: [1]}
    zero_units(dg, removal)
    with torch.no_grad():
        expected = dg.gm(x)
        pruned = fxprune.apply(dg, removal)
        assert_close_to_scale(pruned(x), expected)  # index 4 became 3; -2 stays -2
    assert pruned.get_submodule("qk").weight.shape[0] == 5 * 4
