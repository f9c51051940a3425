"""Table test for fxprune/rules/extra.py: in-place aten activations, grid sampling, cumsum, timm's mask helpers."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import plant_dead_units


def _exported(model, *inputs):
    """The aten graph fxprune itself would capture (without export's guard call)."""
    program = torch.export.export(model, inputs, strict=False)
    try:
        return program.module(check_guards=False)
    except TypeError:  # older torch: no guard module to leave out
        return program.module()


def _oracle(model, *inputs):
    """Plant dead units in every oracle group, prune exactly them, compare with the unpruned graph."""
    dg = fxprune.analyze(model, inputs)
    assert not dg.state.unsupported, dg.report()
    removal = plant_dead_units(dg)
    assert removal, "nothing to prune"
    before = dg.gm(*inputs)
    after = fxprune.apply(dg, removal)(*inputs)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    return dg


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
    gm = _exported(InplaceActs().eval(), x)  # keeps aten.silu_ / hardswish_ / detach_
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.silu_.default", "aten.hardswish_.default"} <= ops
    dg = _oracle(gm, x)
    assert dg.group_of("a.weight", 0).prunable and dg.group_of("b.weight", 0).prunable


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x, grid):
        return self.b(F.grid_sample(self.a(x), grid, align_corners=False))


def test_aten_grid_sampler_carries_channels_and_freezes_positions():
    x, grid = torch.randn(1, 3, 5, 5), torch.rand(1, 3, 3, 2) * 2 - 1
    gm = _exported(Sampler().eval(), x, grid)
    assert any("grid_sampler" in str(n.target) for n in gm.graph.nodes)
    dg = _oracle(gm, x, grid)
    assert dg.group_of("a.weight", 0).units == 6 and dg.group_of("a.weight", 0).prunable


class Scan(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.a(x).cumsum(1))  # (B, T, 6): cumulative over T, channels untouched


def test_cumsum_method_keeps_channels_and_freezes_the_scanned_axis():
    dg = _oracle(Scan().eval(), torch.randn(2, 5, 4))
    assert dg.group_of("a.weight", 0).prunable
    assert dg.group_of("cumsum", 1).frozen


def test_timm_vit_attention_heads_are_prunable():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=5).eval()
    assert timm.layers.use_fused_attn() in (True, False)
    model.blocks[0].attn.fused_attn = False  # the explicit q @ k path, with maybe_add_mask around the scores
    dg = _oracle(model, torch.randn(2, 3, 16, 16))
    groups = dg.groups_of("blocks.0.attn.qkv.weight", 0)
    heads = [g for g in groups if g.units == 4]
    assert heads and heads[0].prunable, dg.report()
