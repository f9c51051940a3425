"""Table test for fxprune/rules/attention.py: scaled_dot_product_attention (GQA too) and nn.MultiheadAttention."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import group_ids, run_oracle


class Sdpa(nn.Module):
    """Self-attention over 4 query heads of dim 2; with ``kv`` < 4 the keys and values are grouped (GQA)."""

    def __init__(self, kv=4, mask=False):
        super().__init__()
        self.kv, self.mask = kv, mask
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 2 * kv)
        self.v = nn.Linear(8, 2 * kv)
        self.o = nn.Linear(8, 8)
        self.register_buffer("causal", torch.ones(3, 3).tril().bool())

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, 4, 2).transpose(1, 2)
        k = self.k(x).view(B, N, self.kv, 2).transpose(1, 2)
        v = self.v(x).view(B, N, self.kv, 2).transpose(1, 2)
        mask = self.causal if self.mask else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv != 4)
        return self.o(o.transpose(1, 2).reshape(B, N, 8))


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_ties_heads_and_splits_qk_and_v_head_dims(mask):
    dg = fxprune.analyze(Sdpa(mask=mask).eval(), (torch.randn(1, 3, 8),), prune_head_dims=True)
    heads, qk = dg.groups_of("q.weight", 0)
    assert (heads.units, qk.units) == (4, 2)
    assert group_ids(dg, "k.weight", 0) == [heads.id, qk.id]
    h2, v = dg.groups_of("v.weight", 0)
    assert h2 is heads and v is not qk and v.units == 2
    assert group_ids(dg, "o.weight", 1) == [heads.id, v.id]
    # the attention output is (B, H, N, Dv); the key/query sequence axes are the input's, frozen
    assert group_ids(dg, "scaled_dot_product_attention", 1) == [heads.id]
    assert dg.group_of("scaled_dot_product_attention", 3) is v
    assert dg.group_of("scaled_dot_product_attention", 2).frozen
    assert {g.id for g in dg.prunable_groups} == {heads.id, qk.id, v.id}
    if mask:  # the mask's axes are the query and key sequence axes
        assert dg.group_of("causal", 0) is dg.group_of("x", 1) is dg.group_of("causal", 1)
    assert not any(g.normalized for g in (heads, qk, v))  # softmax is over the keys, not over these


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_prunes_exactly_and_pins_the_scale(mask):
    x = torch.randn(1, 3, 8)
    dg, removal, pruned = run_oracle(Sdpa(mask=mask), (x,), absolute=True)
    heads, qk = dg.groups_of("q.weight", 0)
    assert len(removal[qk]) == 1  # the q/k head dim shrinks from 2 to 1 ...
    node = next(n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(2))  # ... but the softmax scale stays 1/sqrt(2)
    kept = 4 - len(removal[heads])
    assert f"view(getitem, getitem_1, {kept}, 1)" in pruned.code


def test_gqa_makes_query_heads_a_product_of_kv_groups_and_ranks():
    x = torch.randn(1, 3, 8)
    dg = fxprune.analyze(Sdpa(kv=2).eval(), (x,), prune_head_dims=True)
    kv, rank, qk = dg.groups_of("q.weight", 0)
    assert (kv.units, rank.units, qk.units) == (2, 2, 2)
    assert group_ids(dg, "k.weight", 0) == [kv.id, qk.id]
    kv2, v = dg.groups_of("v.weight", 0)
    assert kv2 is kv and v.units == 2
    assert group_ids(dg, "o.weight", 1) == [kv.id, rank.id, v.id]
    assert {g.id for g in dg.prunable_groups} == {kv.id, rank.id, qk.id, v.id}
    dg, removal, pruned = run_oracle(Sdpa(kv=2), (x,), absolute=True)
    kv, rank, qk = dg.groups_of("q.weight", 0)
    assert pruned.q.out_features == (2 - len(removal[kv])) * (2 - len(removal[rank])) * (2 - len(removal[qk]))
    assert pruned.k.out_features == (2 - len(removal[kv])) * (2 - len(removal[qk]))


class Mha(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h)


def test_multihead_attention_is_decomposed_into_heads():
    x = torch.randn(2, 3, 3)
    dg = fxprune.analyze(Mha().eval(), (x,), prune_head_dims=True)
    assert not any(n.op == "call_module" and n.target == "attn" for n in dg.gm.graph.nodes)
    embed = dg.group_of("inp.weight", 0)
    assert embed.units == 8 and embed.prunable  # the residual stream: in_proj columns, out_proj rows
    assert dg.group_of("attn.in_proj_weight", 1) is embed and dg.group_of("attn.out_proj.weight", 0) is embed
    # in_proj rows are q ++ k ++ v, each (heads x head_dim); heads are shared, q/k dims tied, v dims separate
    heads, qk, v = dg.groups_of("attn.in_proj_weight", 0)  # repeats are listed once
    assert [g.units for g in (heads, qk, v)] == [2, 4, 4] and qk is not v
    assert dg.describe(dg.layout_of("attn.in_proj_weight", 0)) == (
        f"((G{heads.id}(2) x G{qk.id}(4)) ++ (G{heads.id}(2) x G{qk.id}(4)) ++ (G{heads.id}(2) x G{v.id}(4)))")
    assert group_ids(dg, "attn.out_proj.weight", 1) == [heads.id, v.id]
    dg, removal, pruned = run_oracle(Mha(), (x,), absolute=True)
    assert len(removal) == 4


def test_multihead_attention_that_cannot_be_decomposed_is_frozen():
    x = torch.randn(2, 3, 3)
    dg = fxprune.analyze(Mha(add_bias_kv=True).eval(), (x,), prune_head_dims=True)
    assert any(n.op == "call_module" and n.target == "attn" for n in dg.gm.graph.nodes)
    g = dg.group_of("inp.weight", 0)
    assert g.frozen and any("nn.MultiheadAttention" in w for w in g.frozen)
    assert dg.group_of("attn.in_proj_weight", 0).frozen
    assert dg.prunable_groups == []
    with pytest.warns(UserWarning, match="removed 0% .* nn.MultiheadAttention with a configuration"):
        pruned = fxprune.prune(Mha(add_bias_kv=True).eval(), 0.5, example_inputs=(x,), prune_head_dims=True, round_to=1)
    assert pruned(x).shape == (2, 3, 2)
