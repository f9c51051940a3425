"""Table test for fxprune/rules/shape.py: view/reshape/flatten/unflatten, permutes, expand, repeat, factories."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import group_ids, run_oracle
from tests.models import skip_unless_symbolically_traceable


class Heads(nn.Module):
    """q and k projections viewed to (B, N, heads, head_dim) by view, reshape(-1) and unflatten."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        B, N, C = x.shape
        if self.form == "view":
            q = self.q(x).view(B, N, 2, 4).transpose(1, 2)
        elif self.form == "unflatten":
            q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
        elif self.form == "view_tuple":
            q = self.q(x).view((B, N, 2, 4)).transpose(1, 2)
        elif self.form == "aten_swapaxes":  # the aten op by its schema names (self, axis0, axis1)
            q = torch.ops.aten.swapaxes.default(self.q(x).view(B, N, 2, 4), 1, 2)
        else:
            q = torch.reshape(self.q(x), (B, N, 2, 4)).swapaxes(1, 2)
        k = self.k(x).reshape(B, N, 2, -1).permute(0, 2, 3, 1)  # (B, H, D, N)
        a = q @ k  # (B, H, N, N)
        y = (a @ q).transpose(1, 2).reshape(B, N, C)
        return self.o(y)


@pytest.mark.parametrize("form", ["view", "unflatten", "view_tuple", "reshape", "aten_swapaxes"])
def test_view_to_heads_is_a_product_of_heads_and_head_dim(form):
    dg = fxprune.analyze(Heads(form).eval(), (torch.randn(1, 3, 8),), prune_head_dims=True)
    heads, dim = dg.groups_of("q.weight", 0)
    assert (heads.units, dim.units) == (2, 4)
    assert dg.describe(dg.layout_of("q.weight", 0)) == f"(G{heads.id}(2) x G{dim.id}(4))"
    for name, axis in [("q.bias", 0), ("k.weight", 0), ("k.bias", 0), ("o.weight", 1)]:
        assert group_ids(dg, name, axis) == [heads.id, dim.id], name
    assert heads.prunable and dim.prunable
    assert "graph output" in dg.group_of("o.weight", 0).frozen[0]
    assert "graph input" in dg.group_of("q.weight", 1).frozen[0]
    assert sorted(g.units for g in dg.prunable_groups) == [2, 4]


@pytest.mark.parametrize("form", ["view", "unflatten", "view_tuple", "reshape", "aten_swapaxes"])
def test_view_to_heads_rewrites_shape_constants(form):
    skip_unless_symbolically_traceable(Heads(form))
    x = torch.randn(1, 3, 8)
    _, _, pruned = run_oracle(Heads(form), (x,), lambda dg: dg.groups_of("q.weight", 0), fraction=0.5,
                              absolute=True)  # heads and head dims
    assert pruned.q.out_features == pruned.k.out_features == pruned.o.in_features == 1 * 2
    code = pruned.code
    if form == "view":
        assert "view(getitem, getitem_1, 1, 2)" in code
    elif form == "unflatten":
        assert "unflatten(-1, (1, 2))" in code
    elif form == "view_tuple":
        assert "view((getitem, getitem_1, 1, 2))" in code
    elif form == "reshape":
        assert "reshape(q, (getitem, getitem_1, 1, 2))" in code
    else:
        assert "swapaxes.default(view, 1, 2)" in code and "view(getitem, getitem_1, 1, 2)" in code
    assert "reshape(getitem, getitem_1, 1, -1)" in code  # -1 is kept as written


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.a(x).view(B, 2, 4, H, W).transpose(1, 2).reshape(B, C * 4, H, W)
        return self.b(y)


def test_channel_shuffle_permutes_factors():
    x = torch.randn(1, 2, 3, 3)
    dg = fxprune.analyze(ChannelShuffle().eval(), (x,), prune_head_dims=True)
    g, c = dg.groups_of("a.weight", 0)
    assert (g.units, c.units) == (2, 4)
    assert group_ids(dg, "b.weight", 1) == [c.id, g.id]  # the shuffled order
    dg, removal, pruned = run_oracle(ChannelShuffle(), (x,), absolute=True)
    g, c = dg.groups_of("a.weight", 0)
    assert set(removal) == {g, c}
    kept = (2 - len(removal[g])) * (4 - len(removal[c]))
    assert pruned.a.out_channels == pruned.b.in_channels == kept
    assert f"view(getitem, {2 - len(removal[g])}, {4 - len(removal[c])}, getitem_2, getitem_3)" in pruned.code


class FlattenForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(4 * 2 * 2, 3)
        self.fc2 = nn.Linear(4, 3)
        self.unflat = nn.Unflatten(1, (3, 1))

    def forward(self, x):
        y = self.conv(x)
        a = self.fc1(self.flat(y))
        b = self.fc2(y.mean((2, 3)).unsqueeze(1).squeeze(1))
        c = torch.flatten(y, 2).movedim(1, -1)  # (B, HW, C)
        return self.unflat(a + b + c.sum(1).sum(1, keepdim=True)).squeeze(-1)


def test_flatten_unsqueeze_movedim_and_unflatten_module():
    x = torch.randn(2, 2, 2, 2)
    dg = fxprune.analyze(FlattenForms().eval(), (x,), prune_head_dims=True)
    ch = dg.group_of("conv.weight", 0)
    assert ch.units == 4 and ch.prunable
    fc1 = dg.groups_of("fc1.weight", 1)
    assert [g.units for g in fc1] == [4, 2, 2] and fc1[0] is ch
    assert dg.group_of("fc2.weight", 1) is ch
    assert dg.group_of("movedim", 2) is ch
    assert dg.group_of("squeeze", 1) is ch
    assert dg.group_of("unflat", 1) is dg.group_of("fc1.weight", 0)
    assert not ch.normalized  # the mean is over H and W, the sums over channels are exact
    assert dg.group_of("x", 2).frozen  # H, W
    dg, removal, pruned = run_oracle(FlattenForms(), (x,), absolute=True)
    kept = 4 - len(removal[dg.group_of("conv.weight", 0)])
    assert pruned.conv.out_channels == pruned.fc2.in_features == kept
    assert pruned.fc1.in_features == kept * 4
    assert pruned.unflat.unflattened_size == (3, 1)


class RepeatExpandFactories(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(8, 2)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)  # (B, 4)
        r = y.repeat(1, 2)  # (B, 8): copy-major tiling
        z = y.new_zeros(y.shape[0], 4) + torch.zeros(2, 4)  # a size argument, and a traced constant
        e = y.unsqueeze(1).expand(-1, 3, -1)  # (B, 3, 4): the new axis has no data
        f = y.view_as(y) + y.expand_as(y) + z + e.sum(1) + torch.ones_like(y).t().t()
        return self.b(r) + self.c(f)


def test_repeat_expand_and_factories_relations():
    dg = fxprune.analyze(RepeatExpandFactories().eval(), (torch.randn(2, 3),), prune_head_dims=True)
    ch = dg.group_of("a.weight", 0)
    copies, inner = dg.groups_of("b.weight", 1)
    assert inner is ch and copies.units == 2
    assert dg.describe(dg.layout_of("repeat", 1)) == f"(G{copies.id}(2) x G{ch.id}(4))"
    # a copy of the tiling is a real unit: b's columns for that copy can go
    assert copies.prunable and ch.prunable
    for name in ("new_zeros", "_tensor_constant0", "view_as", "expand_as", "ones_like", "t", "t_1"):
        assert dg.group_of(name, 1 if name != "t" else 0) is ch, name
    assert dg.group_of("expand", 2) is ch
    new_axis = dg.group_of("expand", 1)
    assert new_axis.units == 3 and new_axis.broadcast and not new_axis.prunable
    assert dg.group_of("c.weight", 1) is ch
    kinds = {(m.name, m.kind) for m in ch.members}
    # fx stores traced constants as buffers
    assert ("_tensor_constant0", "buffer") in kinds and ("a.weight", "parameter") in kinds


def test_repeat_expand_and_factories_prune_exactly():
    x = torch.randn(2, 3)
    dg, removal, pruned = run_oracle(RepeatExpandFactories(), (x,), absolute=True)
    ch = dg.group_of("a.weight", 0)
    copies = dg.groups_of("b.weight", 1)[0]
    kept_c, kept_r = 4 - len(removal[ch]), 2 - len(removal[copies])
    assert f"repeat(1, {kept_r})" in pruned.code
    assert f"new_zeros(getitem, {kept_c})" in pruned.code
    assert tuple(pruned._tensor_constant0.shape) == (2, kept_c)
    assert "expand(-1, 3, -1)" in pruned.code  # -1 kept, the broadcast axis keeps its size
    assert pruned.b.in_features == kept_c * kept_r


class RepeatInterleave(nn.Module):
    """Each feature copied twice in a row (index-major, unlike repeat's copy-major tiling), then flattened."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.repeat_interleave(self.a(x), 2, dim=1)  # (B, 8) = (feature x copy)
        z = self.b(y).repeat_interleave(1).view(-1, 4)  # no dim: the flattened tensor, every axis frozen
        return self.c(z)


def test_repeat_interleave_is_a_product_of_the_axis_and_its_copies():
    dg = fxprune.analyze(RepeatInterleave().eval(), (torch.randn(2, 3),))
    ch, copies = dg.groups_of("b.weight", 1)
    assert ch is dg.group_of("a.weight", 0) and copies.units == 2 and ch.prunable and copies.prunable
    assert dg.describe(dg.layout_of("repeat_interleave", 1)) == f"(G{ch.id}(4) x G{copies.id}(2))"
    assert "no dim" in dg.group_of("b.weight", 0).frozen[0]
    x = torch.randn(2, 3)
    dg, removal, pruned = run_oracle(RepeatInterleave(), (x,), groups=[ch, copies], absolute=True)
    kept_r = 2 - len(removal[copies])
    assert f"repeat_interleave(a, {kept_r}, dim = 1)" in pruned.code
    assert pruned.b.in_features == (4 - len(removal[ch])) * kept_r


def test_arange_freezes_positions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            pos = torch.arange(4, dtype=x.dtype)
            return self.out(self.fc(x) * pos)

    x = torch.randn(2, 4)
    dg = fxprune.analyze(M().eval(), (x,), prune_head_dims=True)
    g = dg.group_of("fc.weight", 0)
    assert g is dg.group_of("arange", 0)
    if "aten.arange" in dg.gm.code:  # exported (symbolic_trace fails on torch < 2.7): a literal arange is a
        # constant that rules/constants.py slices with the units it is multiplied with, exactly
        assert g.prunable
        run_oracle(M(), (x,), groups=[g], absolute=True)
        return
    assert g.frozen and any("torch.arange" in why for why in g.frozen)
    assert dg.prunable_groups == []


class ShapeOfAnother(nn.Module):
    """Size arguments that are a whole shape read at run time: ``view(y.shape)``, ``new_zeros(y.size())``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(y).reshape(y.shape) + torch.reshape(y, y.size()) + y.view(y.shape)
        return self.b(z + y.new_zeros(y.shape) + torch.zeros_like(y).expand(y.shape))


def test_a_whole_shape_argument_follows_its_tensor():
    skip_unless_symbolically_traceable(ShapeOfAnother())
    x = torch.randn(2, 3)
    dg = fxprune.analyze(ShapeOfAnother().eval(), (x,), prune_head_dims=True)
    g = dg.group_of("a.weight", 0)
    for name in ("reshape", "reshape_1", "view", "new_zeros", "expand"):
        assert dg.group_of(name, 1) is g, name
    # no shape constant for them: the shape node is re-read from the pruned tensor at run time
    assert [c.node.name for c in dg.state.constants if c.node.op != "call_module"] == []
    dg, removal, pruned = run_oracle(ShapeOfAnother(), (x,), absolute=True)
    assert "new_zeros(getattr_3)" in pruned.code and "view(getattr_2)" in pruned.code
    assert pruned.a.out_features == 4 - len(removal[dg.group_of("a.weight", 0)])
