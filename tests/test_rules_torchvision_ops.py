"""Table test for fxprune/rules/torchvision_ops.py: Swin's wrapped shifted_window_attention,
_get_relative_position_bias and _patch_merging_pad, and torchvision.ops.stochastic_depth."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import group_ids, oracle_groups, plant_dead_units, run_oracle

swin = pytest.importorskip("torchvision.models.swin_transformer")


class TinySwin(nn.Module):
    """embed -> one shifted-window block (2 heads of 4, window 2, shift 1) -> patch merging -> head."""

    def __init__(self, v2=False, norms=True):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
        self.block = block(8, 2, [2, 2], [1, 1], stochastic_depth_prob=0.0)
        self.merge = (swin.PatchMergingV2 if v2 else swin.PatchMerging)(8)
        if not norms:  # LayerNorms normalise the stream; without them the dead-unit oracle covers heads too
            self.block.norm1, self.block.norm2, self.merge.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.head = nn.Linear(16, 2)

    def forward(self, x):  # x: (B, H, W, 3)
        return self.head(self.merge(self.block(self.embed(x))))


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == name)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_block_relations(v2):
    dg = fxprune.analyze(TinySwin(v2).eval(), (torch.randn(1, 4, 4, 3),))
    assert dg.state.unsupported == []
    heads, dim = dg.groups_of("embed.weight", 0)
    assert (heads.units, dim.units) == (2, 4)
    hd = f"(G{heads.id}(2) x G{dim.id}(4))"
    # the residual stream, q/k/v rows and proj are (heads x head_dim); the q/k/v block factor is frozen
    for name, axis in (("embed.bias", 0), ("block.attn.qkv.weight", 1), ("block.attn.proj.weight", 0),
                       ("block.attn.proj.weight", 1), ("block.attn.proj.bias", 0), ("block.mlp.0.weight", 1),
                       ("block.mlp.3.weight", 0), ("stochastic_depth", 3), ("shifted_window_attention", 3)):
        assert group_ids(dg, name, axis) == [heads.id, dim.id], (name, axis)
    qkv = dg.groups_of("block.attn.qkv.weight", 0)
    assert [g.units for g in qkv] == [3, 2, 4] and qkv[1:] == [heads, dim]
    assert any("q, k, v blocks" in w for w in qkv[0].frozen)
    assert group_ids(dg, "block.attn.qkv.bias", 0) == [g.id for g in qkv]
    # patch merging concatenates four strided copies of the stream along channels
    assert dg.describe(dg.layout_of("merge.reduction.weight", 1)) == f"({hd} ++ {hd} ++ {hd} ++ {hd})"
    member = next(m for m in heads.members if m.name == "merge.reduction.weight")
    assert member.indices(heads, [1]).tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]
    for d in (1, 2):  # spatial axes of the merged output
        assert any("spatial axis" in w for w in dg.group_of("_patch_merging_pad", d).frozen)
    if v2:  # the continuous position bias MLP ends in one output per head; logit_scale is per head
        assert dg.group_of("block.attn.cpb_mlp.2.weight", 0) is heads
        assert dg.group_of("block.attn.logit_scale", 0) is heads
    else:  # one learned bias per head, rows indexed by relative position
        table = "block.attn.relative_position_bias_table"
        assert dg.group_of(table, 1) is heads
        assert any("relative position table" in w for w in dg.group_of(table, 0).frozen)
    assert heads.normalized and dim.normalized  # the block's LayerNorms normalise over the whole stream
    mlp = dg.group_of("block.mlp.0.weight", 0)
    assert mlp.units == 32 and mlp.prunable and dg.group_of("block.mlp.3.weight", 1) is mlp
    assert dg.group_of("merge.reduction.weight", 0).units == 16


@pytest.mark.parametrize("v2", [False, True])
def test_swin_block_prunes_exactly_without_norms(v2):
    x = torch.randn(1, 4, 4, 3)
    dg, removal, pruned = run_oracle(TinySwin(v2, norms=False), (x,), prune_head_dims=False, absolute=True)
    heads, dim = dg.groups_of("embed.weight", 0)
    # V1 scales q by head_dim ** -0.5 at run time, so its head dim is flagged; V2's cosine attention is exact
    assert heads in oracle_groups(dg) and (dim in oracle_groups(dg)) is v2
    assert len(removal[heads]) == 1
    node = _node(pruned, "shifted_window_attention")
    assert node.args[5] == 1  # num_heads follows the heads group
    kept = 1 * (4 - len(removal.get(dim, [])))
    assert tuple(pruned.block.attn.qkv.weight.shape) == (3 * kept, kept)
    assert pruned.merge.reduction.in_features == 4 * kept
    if not v2:
        assert tuple(pruned.block.attn.relative_position_bias_table.shape) == (9, 1)
    else:
        assert tuple(pruned.block.attn.logit_scale.shape) == (1, 1, 1)


def test_swin_block_prunes_at_a_ratio_with_norms():
    x = torch.randn(1, 4, 4, 3)
    model = TinySwin().eval()
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), round_to=1)
    assert pruned(x).shape == model(x).shape == (1, 2, 2, 2)
    assert _node(pruned, "shifted_window_attention").args[5] == 1
    assert pruned.embed.out_features == 1 * 2 and getattr(pruned.block.mlp, "0").out_features == 16


def test_swin_v1_head_dim_flag_is_needed():
    """Why V1's head dim is flagged: even dead head-dim units change the output (the q scale changes)."""
    x = torch.randn(1, 4, 4, 3)
    dg = fxprune.analyze(TinySwin(norms=False).eval(), (x,))
    _, dim = dg.groups_of("embed.weight", 0)
    removal = plant_dead_units(dg, [dim], seed=0)
    before = dg.gm(x)
    after = fxprune.apply(dg, removal)(x)
    assert after.shape == before.shape
    assert (after - before).abs().max() > 1e-4
