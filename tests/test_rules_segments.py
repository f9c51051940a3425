"""Table test for fxprune/rules/segments.py: cat, stack, split, chunk, unbind, narrow, slicing, tuple items."""

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import run_oracle


class CatSplit(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 6)
        self.c = nn.Linear(10, 2)
        self.d = nn.Linear(4, 2)
        self.e = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        p, q = y.split([4, 6], dim=-1) if self.method else torch.split(y, [4, 6], 1)
        return self.c(y) + self.d(p) + self.e(q)


@pytest.mark.parametrize("method", [True, False])
def test_cat_is_a_concatenation_of_its_input_groups(method):
    dg = fxprune.analyze(CatSplit(method).eval(), (torch.randn(2, 3),))
    a, b = dg.group_of("a.weight", 0), dg.group_of("b.weight", 0)
    assert (a.units, b.units) == (4, 6) and a is not b
    assert dg.groups_of("cat", 1) == [a, b]
    assert dg.describe(dg.layout_of("c.weight", 1)) == f"(G{a.id}(4) ++ G{b.id}(6))"
    # split back along the same boundary: each piece is exactly one input group
    assert dg.group_of("getitem", 1) is a and dg.group_of("d.weight", 1) is a
    assert dg.group_of("getitem_1", 1) is b and dg.group_of("e.weight", 1) is b
    # the batch axis is shared by the pieces and the whole
    assert dg.group_of("getitem", 0) is dg.group_of("cat", 0) is dg.group_of("x", 0)
    assert sorted(g.units for g in dg.prunable_groups) == [4, 6]


@pytest.mark.parametrize("method", [True, False])
def test_cat_split_prunes_and_rewrites_split_sizes(method):
    dg, removal, pruned = run_oracle(CatSplit(method), (torch.randn(2, 3),), absolute=True)
    a, b = dg.group_of("a.weight", 0), dg.group_of("b.weight", 0)
    na, nb = 4 - len(removal[a]), 6 - len(removal[b])
    assert pruned.c.in_features == na + nb and (pruned.d.in_features, pruned.e.in_features) == (na, nb)
    assert f"[{na}, {nb}], dim = 1" in pruned.code


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 1)
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        u, v = self.conv(x).chunk(2, dim=1)
        return self.left(u) + self.right(v)


def test_chunk_cuts_the_producer_into_segments():
    x = torch.randn(1, 2, 2, 2)
    dg = fxprune.analyze(Chunk().eval(), (x,))
    u, v = dg.groups_of("conv.weight", 0)
    assert (u.units, v.units) == (4, 4) and u is not v
    assert dg.groups_of("conv.bias", 0) == [u, v]
    assert dg.group_of("left.weight", 1) is u and dg.group_of("right.weight", 1) is v
    assert dg.group_of("getitem", 1) is u and dg.group_of("getitem_1", 1) is v
    dg, removal, pruned = run_oracle(Chunk(), (x,), fraction=0.5, seed=3, absolute=True)
    u, v = dg.groups_of("conv.weight", 0)
    assert len(removal[u]) == len(removal[v]) == 2
    # a chunk of 2 + 2 stays a chunk-compatible split with explicit sizes
    assert pruned.conv.out_channels == 4 and pruned.left.in_channels == pruned.right.in_channels == 2


def test_uneven_chunk_becomes_split():
    x = torch.randn(1, 2, 2, 2)
    _, _, pruned = run_oracle(Chunk(), (x,), lambda dg: dg.groups_of("conv.weight", 0)[:1], fraction=0.5,
                              absolute=True)
    assert "conv.split([2, 4], dim = 1)" in pruned.code  # chunk(2) cannot say 2 + 4


class Slices(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.m = nn.Linear(3, 2)   # y[:, 1:4]
        self.n = nn.Linear(2, 2)   # narrow(y, 1, 4, 2)
        self.t = nn.Linear(2, 2)   # y[..., -2:]
        self.all = nn.Linear(8, 2)

    def forward(self, x):
        y = self.fc(x)
        return (self.m(y[:, 1:4]) + self.n(torch.narrow(y, 1, 4, 2)) + self.t(y[..., -2:])
                + self.all(y) + y[:, :1])


def test_slices_and_narrow_cut_segments():
    dg = fxprune.analyze(Slices().eval(), (torch.randn(2, 3),))
    groups = dg.groups_of("fc.weight", 0)
    # [0:1] ++ [1:4] ++ [4:6] ++ [6:8]
    assert [g.units for g in groups] == [1, 3, 2, 2]
    first, mid, nar, tail = groups
    assert dg.group_of("m.weight", 1) is mid
    assert dg.group_of("n.weight", 1) is nar and dg.group_of("narrow", 1) is nar
    assert dg.group_of("t.weight", 1) is tail
    assert dg.groups_of("all.weight", 1) == groups
    # y[:, :1] has one unit: size-1 axes are never tied (they broadcast), so it has a 1-unit group of its own
    assert dg.group_of("getitem_2", 1).units == 1 and not first.prunable
    assert sorted(g.units for g in dg.prunable_groups) == [2, 2, 3]


def test_slices_and_narrow_rewrite_bounds():
    x = torch.randn(2, 3)
    dg = fxprune.analyze(Slices().eval(), (x,))
    _, mid, nar, tail = dg.groups_of("fc.weight", 0)
    removal = {mid: [0, 2], nar: [1], tail: [0]}  # planted by hand: fc rows 1, 3, 5, 6
    with torch.no_grad():
        fc, m, n, t, al = dg.gm.fc, dg.gm.m, dg.gm.n, dg.gm.t, dg.gm.all
        for rows, consumer, cols in (([1, 3], m, [0, 2]), ([5], n, [1]), ([6], t, [0])):
            fc.weight[rows] = 0
            fc.bias[rows] = 0
            consumer.weight[:, cols] = 0
            al.weight[:, rows] = 0
    before = dg.gm(x)
    pruned = fxprune.apply(dg, removal)
    torch.testing.assert_close(pruned(x), before, atol=1e-5, rtol=0)
    code = pruned.code
    assert "slice(1, 2, None)" in code      # y[:, 1:4] keeps 1 of 3
    assert "narrow(fc, 1, 2, 1)" in code    # start follows the pruned prefix, length the kept units
    assert "slice(-1, None, None)" in code  # y[..., -2:] keeps 1 of 2
    assert pruned.fc.out_features == 1 + 1 + 1 + 1



class EllipsisSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.m = nn.Linear(3, 2)
        self.all = nn.Linear(8, 2)

    def forward(self, x):
        y = self.fc(x)
        return self.m(y[..., 1:4]) + self.all(y)


def test_a_slice_after_an_ellipsis_rewrites_the_entry_written():
    """``y[..., 1:4]`` on a 3-d ``y``: the ellipsis stands for two axes, the slice is still entry 1 of the index."""
    x = torch.randn(2, 5, 3)
    dg = fxprune.analyze(EllipsisSlice().eval(), (x,))
    first, mid, tail = dg.groups_of("fc.weight", 0)
    assert [g.units for g in (first, mid, tail)] == [1, 3, 4]
    dg, removal, pruned = run_oracle(EllipsisSlice(), (x,), groups=[mid], fraction=0.34, absolute=True)
    assert pruned.m.in_features == 2 and "fc[(Ellipsis, slice(1, 3, None))]" in pruned.code

class Frozen(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        ya, yb = self.a(x), self.b(x)
        if self.kind == "stack":
            z = torch.stack([ya, yb], dim=1).sum(1)
        elif self.kind == "unbind":
            z = torch.stack([ya, yb], dim=-1).unbind(-1)[0]
        elif self.kind == "int":
            z = yb * ya[:, 1].unsqueeze(-1)
        elif self.kind == "strided":
            z = torch.cat([ya[:, ::2], yb[:, ::2]], 1)
        else:
            z = ya[torch.tensor([0, 1]), torch.tensor([2, 3])].unsqueeze(-1) * yb + ya  # two tensor indices
        return self.out(z)


def test_stack_ties_operands_and_freezes_the_new_axis():
    dg = fxprune.analyze(Frozen("stack").eval(), (torch.randn(2, 3),))
    g = dg.group_of("a.weight", 0)
    assert g is dg.group_of("b.weight", 0) is dg.group_of("stack", 2) is dg.group_of("out.weight", 1)
    assert g.prunable and g.units == 4
    new = dg.group_of("stack", 1)
    assert new.units == 2 and any("stacked tensors" in why for why in new.frozen)
    run_oracle(Frozen("stack"), (torch.randn(2, 3),), absolute=True)


@pytest.mark.parametrize("kind,why", [("strided", "strided slice"), ("advanced", "advanced indexing")])
def test_data_dependent_or_strided_indexing_freezes(kind, why):
    dg = fxprune.analyze(Frozen(kind).eval(), (torch.randn(2, 3),))
    g = dg.group_of("a.weight", 0)
    assert g.frozen and any(why in w for w in g.frozen), g.frozen
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(Frozen(kind).eval(), 0.5, example_inputs=(x,))
    assert pruned(x).shape == (2, 2) and pruned.a.out_features == 4
    # nothing else to prune: said so, with the reason
    assert any("fxprune removed 0%" in str(w.message) and why in str(w.message) for w in caught)


def test_integer_index_keeps_the_picked_unit_and_leaves_the_rest_prunable():
    """``ya[:, 1]`` reads one unit of ``a``: that unit is a frozen group of its own, the units after it are one
    prunable group (read nowhere else: dead, the oracle prunes them exactly), and the index stays 1."""
    dg = fxprune.analyze(Frozen("int").eval(), (torch.randn(2, 3),))
    before, picked, after = dg.groups_of("a.weight", 0)
    assert [g.units for g in (before, picked, after)] == [1, 1, 2]  # a one-unit group keeps its unit
    assert after.prunable and not picked.prunable and any("integer index" in w for w in picked.frozen)
    dg, removal, pruned = run_oracle(Frozen("int"), (torch.randn(2, 3),), groups=[after], fraction=0.5, absolute=True)
    assert pruned.a.out_features == 3 and "getitem = a[(slice(None, None, None), 1)]" in pruned.code


class PickedHeads(nn.Module):
    """Falcon's kv group: a fused projection viewed as ``(B, S, H + 2, D)``, the query heads sliced ``[..., :-2, :]``,
    the key and value heads picked by integer indices (``aten.select.int`` once exported)."""

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.qkv = nn.Linear(4, 5 * 2)  # 3 query heads, a key head and a value head, head_dim 2
        self.out = nn.Linear(3 * 2, 3)

    def forward(self, x):
        grouped = self.qkv(x).unflatten(-1, (5, 2))
        q, k, v = grouped[..., :-2, :], grouped[..., self.key, :], grouped[..., -1, :]
        return self.out((q * k.unsqueeze(-2) + v.unsqueeze(-2)).flatten(-2))


@pytest.mark.parametrize("exported", [False, True])
@pytest.mark.parametrize("key", [3, -2])
def test_integer_index_of_a_head_keeps_the_other_heads_prunable(key, exported):
    x = torch.randn(1, 3, 4)
    model = PickedHeads(key).eval()
    if exported:
        model = fxprune.testing.exported(model, x)
        assert "aten.select.int" in str(model.graph)
    dg, removal, pruned = run_oracle(model, (x,), lambda dg: dg.groups_of("qkv.weight", 0)[:1],  # one query head
                                     prune_head_dims=False, absolute=True)
    queries, k, v, dim = dg.groups_of("qkv.weight", 0)
    assert dg.describe(dg.layout_of("qkv.weight", 0)) == \
        f"((G{queries.id}(3) ++ G{k.id}(1) ++ G{v.id}(1)) x G{dim.id}(2))"
    assert queries.prunable and queries.units == 3 and len(removal[queries]) == 1
    assert not k.prunable and not v.prunable  # one unit each: kept
    assert pruned.get_parameter("qkv.weight").shape[0] == 4 * 2
    # the key is still the unit after the query heads: 3 moves to 2, -2 stays -2
    moved = 2 if key == 3 else -2
    assert (f"select.int(unflatten, 2, {moved})" if exported else f"unflatten[(Ellipsis, {moved}, ") in pruned.code

class TailRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))[:, -2:]


def test_slice_on_a_frozen_axis_is_left_as_written():
    """Pruning channels must not turn ``[:, -2:]`` over the sequence into a fixed ``[:, 3:]``."""
    model = TailRows().eval()
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 5, 4),))
    assert pruned.a.out_features == 3
    assert "slice(-2, None, None)" in pruned.code
    longer = torch.randn(1, 7, 4)
    assert pruned(longer).shape == model(longer).shape == (1, 2, 4)


class TupleItems(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        parts = self.a(x).chunk(3, 1)
        rest = parts[1:]  # a tuple slice
        return self.b(rest[0]) + self.c(parts[-1])  # and a negative index


def test_tuple_slices_and_negative_indices_pick_the_right_elements():
    x = torch.randn(1, 2, 2, 2)
    dg = fxprune.analyze(TupleItems().eval(), (x,))
    first, second, third = dg.groups_of("a.weight", 0)
    assert dg.group_of("getitem_1", 1) is second and dg.group_of("b.weight", 1) is second
    assert dg.group_of("getitem_2", 1) is third and dg.group_of("c.weight", 1) is third
    assert first.prunable and [g.units for g in dg.prunable_groups] == [2, 2, 2]
    dg, removal, pruned = run_oracle(TupleItems(), (x,), absolute=True)
    assert pruned.a.out_channels == 3 and pruned.b.in_channels == pruned.c.in_channels == 1


class ShapeOnlyIndex(nn.Module):
    """``h[:, :, 5]`` taken for its shape only (BART's ``embed_positions(inputs_embeds[:, :, -1])``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.pos = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        length = h[:, :, 5].shape[1]
        return self.out(h + self.pos(torch.arange(length)))


@pytest.mark.parametrize("exported", [False, True])
def test_integer_index_read_for_its_shape_only_leaves_the_axis_prunable(exported):
    x = torch.randn(2, 4, 3)
    model = ShapeOnlyIndex().eval()
    if exported:  # aten.select, its result unused in a static graph
        model = fxprune.testing.exported(model, x)
    # half the units go: the index 5 is clamped into the 4 that stay, and the outputs do not change
    dg, _, pruned = run_oracle(model, (x,), lambda dg: [dg.group_of("a.weight", 0)], fraction=0.5,
                               prune_head_dims=False, absolute=True)
    hidden = dg.group_of("a.weight", 0)
    assert hidden.units == 8 and hidden.prunable, hidden.frozen
    assert pruned.get_parameter("a.weight").shape[0] == 4
