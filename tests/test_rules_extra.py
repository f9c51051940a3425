"""Table test for fxprune/rules/extra.py: in-place aten activations, grid sampling, cumsum, timm's mask helpers."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.algebra.context import AnalysisState, RuleContext
from fxprune.testing import exported, plant_dead_units, run_oracle


class InplaceActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.silu(self.a(x), inplace=True)
        y = F.hardswish(self.b(y), inplace=True)
        return self.c(y.detach_())


def test_inplace_aten_activations_are_elementwise():
    x = torch.randn(1, 3, 4, 4)
    gm = exported(InplaceActs().eval(), x)  # keeps aten.silu_ / hardswish_ / detach_
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.silu_.default", "aten.hardswish_.default"} <= ops
    dg, _, _ = run_oracle(gm, (x,), absolute=True, all_supported=True)
    assert dg.group_of("a.weight", 0).prunable and dg.group_of("b.weight", 0).prunable


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x, grid):
        return self.b(F.grid_sample(self.a(x), grid, align_corners=False))


def test_aten_grid_sampler_carries_channels_and_freezes_positions():
    x, grid = torch.randn(1, 3, 5, 5), torch.rand(1, 3, 3, 2) * 2 - 1
    gm = exported(Sampler().eval(), x, grid)
    assert any("grid_sampler" in str(n.target) for n in gm.graph.nodes)
    dg, _, _ = run_oracle(gm, (x, grid), absolute=True, all_supported=True)
    assert dg.group_of("a.weight", 0).units == 6 and dg.group_of("a.weight", 0).prunable


class Scan(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.a(x).cumsum(1))  # (B, T, 6): cumulative over T, channels untouched


def test_cumsum_method_keeps_channels_and_freezes_the_scanned_axis():
    dg, _, _ = run_oracle(Scan().eval(), (torch.randn(2, 5, 4),), absolute=True, all_supported=True)
    assert dg.group_of("a.weight", 0).prunable
    assert dg.group_of("cumsum", 1).frozen


def test_timm_vit_attention_heads_are_prunable():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=5).eval()
    assert timm.layers.use_fused_attn() in (True, False)
    model.blocks[0].attn.fused_attn = False  # the explicit q @ k path, with maybe_add_mask around the scores
    dg, _, _ = run_oracle(model, (torch.randn(2, 3, 16, 16),), absolute=True, all_supported=True)
    groups = dg.groups_of("blocks.0.attn.qkv.weight", 0)
    heads = [g for g in groups if g.units == 4]
    assert heads and heads[0].prunable, dg.report()


class Products(nn.Module):
    """mm, bmm and baddbmm, whose aten schemas name the second operand ``mat2`` / ``batch1``, ``batch2``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.q, self.k, self.o = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(3, 2)
        self.bias = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):  # x: (3, 4)
        h = torch.mm(x, self.w)  # (3, 6)
        q, k = self.q(h).unsqueeze(0), self.k(h).unsqueeze(0)  # (1, 3, 5)
        scores = torch.bmm(q, k.transpose(1, 2))  # (1, 3, 3)
        scores = torch.baddbmm(self.bias.unsqueeze(0), q, k.transpose(1, 2)) + scores
        return self.o(scores)


def test_aten_mm_bmm_baddbmm_bind_their_schema_names():
    x = torch.randn(3, 4)
    gm = exported(Products().eval(), x)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.mm.default", "aten.bmm.default", "aten.baddbmm.default"} <= ops
    dg, _, _ = run_oracle(gm, (x,), absolute=True, all_supported=True)
    hidden = dg.group_of("w", 1)
    assert hidden.units == 6 and hidden.prunable
    assert dg.group_of("q.weight", 1) is hidden and dg.group_of("k.weight", 1) is hidden
    qk = dg.group_of("q.weight", 0)  # the contraction of bmm and baddbmm ties q's and k's features
    assert qk.units == 5 and qk.prunable and dg.group_of("k.weight", 0) is qk


def test_a_rule_argument_missing_from_the_schema_names_the_node():
    gm = exported(Products().eval(), torch.randn(3, 4))
    fxprune.analyze(gm, (torch.randn(3, 4),))  # propagated shapes
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    r = RuleContext(AnalysisState(gm), node, None)

    def wrong_signature(input, weight):  # noqa: A002
        pass

    with pytest.raises(fxprune.FxPruneError, match=r"node 'mm' .*'weight' matches no argument of aten::mm"):
        r.bind(wrong_signature)


class AtenOnly(nn.Module):
    """``x @ w.T`` (aten.numpy_T), a roll, a weight-normed linear (aten._weight_norm), repeat_interleave."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
        self.b = nn.Linear(10, 3)

    def forward(self, x):  # x: (2, 3, 4)
        y = torch.roll(x @ self.w.T, 1, 1)  # rolls the sequence axis, not the features
        return self.b(self.a(y).repeat_interleave(2, dim=-1))


def test_aten_numpy_t_roll_weight_norm_and_repeat_interleave_relations():
    x = torch.randn(2, 3, 4)
    gm = exported(AtenOnly().eval(), x)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.numpy_T.default", "aten.roll.default", "aten._weight_norm.default",
            "aten.repeat_interleave.self_int"} <= ops
    dg = fxprune.analyze(gm, (x,))
    assert not dg.state.unsupported, dg.report()
    v, g = "a.parametrizations.weight.original1", "a.parametrizations.weight.original0"
    hidden = dg.group_of("w", 0)  # w.T's columns are w's rows
    assert hidden.units == 6 and hidden.prunable and dg.group_of(v, 1) is hidden
    assert "rolled axis" in dg.group_of("roll", 1).frozen[0]
    out = dg.group_of(v, 0)  # g carries v's dim-0 units
    assert out.units == 5 and out.prunable and dg.group_of(g, 0) is out and dg.group_of("a.bias", 0) is out
    # each feature copied twice in a row: b's input axis is (feature x copy)
    assert dg.describe(dg.layout_of("b.weight", 1)) == f"(G{out.id}(5) x G{dg.groups_of('b.weight', 1)[1].id}(2))"


def test_aten_numpy_t_roll_weight_norm_and_repeat_interleave_prune_exactly():
    x = torch.randn(2, 3, 4)
    gm = exported(AtenOnly().eval(), x)
    dg = fxprune.analyze(gm, (x,))
    removal = plant_dead_units(dg)
    assert len(removal) == 3
    with torch.no_grad():  # a zero row of v would make its norm 0/0: a dead unit of weight norm has a zero g
        v = dg.gm.get_parameter("a.parametrizations.weight.original1")
        v[removal[dg.group_of("a.bias", 0)]] = 1.0
        before = dg.gm(x)
        pruned = fxprune.apply(dg, removal)
        torch.testing.assert_close(pruned(x), before, atol=1e-5, rtol=0)
    kept = 2 - len(removal[dg.groups_of("b.weight", 1)[1]])
    assert "repeat_interleave.self_int(" in pruned.code and pruned.b.weight.shape[1] == (5 - 2) * kept
