"""Table test for fxprune/rules/spatial.py: pooling, interpolation, padding, pixel (un)shuffle, roll."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import exported, run_oracle


class Pools2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.up = nn.Upsample(scale_factor=2)
        self.pad = nn.ZeroPad2d(1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))  # (B, 4, 4, 4)
        y = self.pool(y) + F.avg_pool2d(y, 2) + F.adaptive_max_pool2d(y, 2)
        y = self.up(y) + F.interpolate(y, size=(4, 4), mode="bilinear") + self.gap(y)
        y = self.pad(y) + F.pad(y, (1, 1, 1, 1))  # pads H and W only
        return self.head(torch.roll(y, (1, 1), dims=(2, 3)))


def test_pools_resample_and_pads_carry_channels_and_freeze_spatial_axes():
    dg = fxprune.analyze(Pools2d().eval(), (torch.randn(2, 2, 4, 4),))
    ch = dg.group_of("conv.weight", 0)
    assert ch.units == 4 and ch.prunable and not ch.normalized
    for name in ("pool", "avg_pool2d", "adaptive_max_pool2d", "up", "interpolate", "gap", "pad", "pad_1", "roll"):
        assert dg.group_of(name, 1) is ch, name
        assert dg.group_of(name, 0) is dg.group_of("x", 0), name
    assert dg.group_of("head.weight", 1) is ch
    reasons = {"pool": "spatial axis", "up": "spatial axis", "pad": "padded axis", "roll": "rolled axis"}
    for name, why in reasons.items():
        for d in (2, 3):
            assert any(why in w for w in dg.group_of(name, d).frozen), (name, d)
    assert [g.units for g in dg.prunable_groups] == [4]
    run_oracle(Pools2d(), (torch.randn(2, 2, 4, 4),), absolute=True)


class Pools1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 1)
        self.c3 = nn.Conv3d(2, 6, 1)
        self.fc = nn.Linear(4 + 6, 2)

    def forward(self, x, v):
        a = F.adaptive_avg_pool1d(nn.functional.max_pool1d(torch.relu(self.c1(x)), 2), 1).flatten(1)
        b = nn.functional.avg_pool3d(torch.relu(self.c3(v)), 2).flatten(1)
        return self.fc(torch.cat([a, b], 1))


def test_pools_1d_and_3d():
    x, v = torch.randn(2, 2, 4), torch.randn(2, 2, 2, 2, 2)
    dg = fxprune.analyze(Pools1d3d().eval(), (x, v))
    a, b = dg.group_of("c1.weight", 0), dg.group_of("c3.weight", 0)
    assert dg.groups_of("fc.weight", 1) == [a, b]
    assert dg.group_of("max_pool1d", 1) is a and dg.group_of("avg_pool3d", 1) is b
    assert dg.group_of("avg_pool3d", 4).frozen and dg.group_of("max_pool1d", 2).frozen
    run_oracle(Pools1d3d(), (x, v), absolute=True)


class ChannelPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))  # adds a zero channel on each side


def test_padding_the_channel_axis_freezes_it():
    dg = fxprune.analyze(ChannelPad().eval(), (torch.randn(1, 2, 3, 3),))
    g = dg.group_of("a.weight", 0)
    assert any("padded axis" in w and "pad" in w for w in g.frozen)
    assert dg.group_of("pad", 2) is dg.group_of("a", 2)  # H, W are not padded: they carry over
    assert dg.prunable_groups == []


class PixelShuffles(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Conv2d(2, 8, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.mid = nn.Conv2d(2, 3, 1)
        self.down = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.mid(self.shuffle(self.up(x)))  # (B, 8, H, W) -> (B, 2, 2H, 2W) -> (B, 3, 2H, 2W)
        return self.down(F.pixel_unshuffle(torch.relu(y), 2))  # -> (B, 12, H, W)


def test_pixel_shuffle_is_a_product_with_frozen_spatial_factors():
    dg = fxprune.analyze(PixelShuffles().eval(), (torch.randn(1, 2, 2, 2),))
    c, r1, r2 = dg.groups_of("up.weight", 0)
    assert (c.units, r1.units, r2.units) == (2, 2, 2)
    assert dg.group_of("mid.weight", 1) is c and dg.group_of("shuffle", 1) is c
    assert r1.frozen and "pixel shuffle" in r1.frozen[0] and r2.frozen
    m, s1, s2 = dg.groups_of("down.weight", 1)
    assert m is dg.group_of("mid.weight", 0) and m.units == 3 and s1.frozen and s2.frozen
    assert sorted(g.units for g in dg.prunable_groups) == [2, 3]
    dg, removal, pruned = run_oracle(PixelShuffles(), (torch.randn(1, 2, 2, 2),), absolute=True)
    c, m = dg.groups_of("up.weight", 0)[0], dg.group_of("mid.weight", 0)
    assert pruned.up.out_channels == 4 * (2 - len(removal[c]))
    assert pruned.down.in_channels == 4 * (3 - len(removal[m]))


@pytest.mark.parametrize("capture", ["trace", "export"])  # export: aten.roll, with dims=[] for None
@pytest.mark.parametrize("dims,frozen_channel", [((2, 3), False), (1, True), (None, True)])
def test_roll_freezes_rolled_axes(dims, frozen_channel, capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            if dims is None:
                return self.b(torch.roll(y, 1))
            return self.b(torch.roll(y, (1,) * len(dims) if isinstance(dims, tuple) else 1, dims))

    x = torch.randn(1, 2, 3, 3)
    dg = fxprune.analyze(M().eval() if capture == "trace" else exported(M().eval(), x), (x,))
    assert not dg.state.unsupported
    g = dg.group_of("a.weight", 0)
    assert bool(g.frozen) is frozen_channel
    if frozen_channel:
        assert any("rolled axis" in w for w in g.frozen)
