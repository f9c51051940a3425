"""Recompose: a decomposed nn.MultiheadAttention is an nn.MultiheadAttention again in the pruned graph.

The plain class when the pruned widths fit it (ratio 0, or heads and residual
pruned to the same width), else ``PrunedMultiheadAttention``; a call whose q/k
and v head dims were pruned apart stays decomposed. Every case passes the
dead-unit oracle.

Cases: ratio 0 gives the same module; the oracle with heads, residual and head dims pruned; masks, ``need_weights``,
cross-attention; apply, replay and iterative pruning; saving.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.analysis.macs import count_graph, estimate
from fxprune.modules import PrunedMultiheadAttention
from fxprune.testing import assert_close_to_scale, oracle_groups, run_oracle


class Attn(nn.Module):
    """Self- or cross-attention (kdim/vdim) with a residual, optional masks and used attention weights."""

    def __init__(self, batch_first=True, cross=False, need_weights=False, average=True):
        super().__init__()
        self.batch_first, self.cross, self.need_weights, self.average = batch_first, cross, need_weights, average
        self.q_in = nn.Linear(6, 32)
        if cross:
            self.k_in, self.v_in = nn.Linear(6, 24), nn.Linear(6, 20)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=24 if cross else None,
                                          vdim=20 if cross else None)
        self.out = nn.Linear(32, 3)

    def forward(self, x, memory, key_padding_mask=None, attn_mask=None):
        h = self.q_in(x)
        k, v = (self.k_in(memory), self.v_in(memory)) if self.cross else (h, h)
        a, w = self.attn(h, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         need_weights=self.need_weights, average_attn_weights=self.average)
        out = self.out(F.gelu(a) + h)
        return (out, w) if self.need_weights else out


def inputs(batch_first=True, cross=False, masks=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 5
    S = 7 if cross else L
    x = torch.randn((B, L, 6) if batch_first else (L, B, 6), generator=g)
    memory = torch.randn((B, S, 6) if batch_first else (S, B, 6), generator=g) if cross else x
    if not masks:
        return x, memory
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    return x, memory, padding, torch.ones(L, S, dtype=torch.bool).triu(1)  # causal: no row fully masked


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Attn(**kwargs).eval()


def in_proj_groups(dg):
    """(heads, q/k head dim, v head dim) of the attention's q rows."""
    packed = dict(dg.gm.named_parameters()).get("attn.in_proj_weight") is not None
    heads, qk = dg.groups_of("attn.in_proj_weight" if packed else "attn.q_proj_weight", 0)[:2]
    v = [g for g in dg.groups_of("attn.out_proj.weight", 1) if g is not heads][0]
    return heads, qk, v


def no_head_dims(dg):
    _, qk, v = in_proj_groups(dg)
    return [g for g in oracle_groups(dg) if g not in (qk, v)]


def is_decomposed(gm) -> bool:
    return not any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)


VARIANTS = [dict(batch_first=bf, cross=cross, need_weights=nw, average=avg)
            for bf in (True, False) for cross in (False, True) for nw, avg in ((False, True), (True, True),
                                                                               (True, False))]


@pytest.mark.parametrize("masks", [False, True], ids=["no_mask", "masks"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={int(x)}" for k, x in v.items()))
@torch.no_grad()
def test_ratio_zero_gives_back_the_same_multihead_attention(variant, masks):
    model = build(**variant)
    x = inputs(variant["batch_first"], variant["cross"], masks)
    pruned = fxprune.prune(model, 0.0, example_inputs=x, round_to=1)
    assert type(pruned.attn) is nn.MultiheadAttention and not pruned.attn.training
    for attr in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout",
                 "_qkv_same_embed_dim"):
        assert getattr(pruned.attn, attr) == getattr(model.attn, attr), attr
    assert sum(n.op == "call_module" and n.target == "attn" for n in pruned.graph.nodes) == 1
    assert_close_to_scale(pruned(*x), model(*x))
    if not masks:  # mask arguments left at None while analysing are still passed on to the module
        with_masks = inputs(variant["batch_first"], variant["cross"], masks=True)
        assert_close_to_scale(pruned(*with_masks), model(*with_masks))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={int(x)}" for k, x in v.items()))
def test_pruned_heads_and_residual_make_a_pruned_multihead_attention(variant):
    x = inputs(variant["batch_first"], variant["cross"], masks=True)
    dg, removal, pruned = run_oracle(build(**variant), x, no_head_dims)
    heads, _, _ = in_proj_groups(dg)
    residual = dg.group_of("q_in.weight", 0)
    # returned weights: averaged over heads (heads normalised), or per head (heads are a graph output)
    assert residual in removal and (heads in removal) != variant["need_weights"]
    m = pruned.attn
    assert type(m) is PrunedMultiheadAttention and m.batch_first == variant["batch_first"]
    assert m.num_heads == 4 - len(removal.get(heads, ())) and m.head_dim == 8 and m.scale is None
    assert m.embed_dim == m.out_dim == 32 - len(removal[residual])
    assert m._qkv_same_embed_dim == (not variant["cross"])
    if variant["cross"]:
        assert (m.kdim, m.vdim) == tuple(n - len(removal[dg.group_of(f"{p}.weight", 0)])
                                      for p, n in (("k_in", 24), ("v_in", 20)))
    assert count_graph(pruned)[0] == estimate(dg, removal)[0]  # the module is counted as its decomposition


@torch.no_grad()
def test_only_heads_pruned():
    x = inputs()
    dg, removal, pruned = run_oracle(build(), x, lambda dg: in_proj_groups(dg)[:1], fraction=0.5)
    assert type(pruned.attn) is PrunedMultiheadAttention
    assert (pruned.attn.num_heads, pruned.attn.embed_dim, pruned.attn.out_dim) == (2, 32, 32)


@torch.no_grad()
def test_heads_and_residual_pruned_to_one_width_give_plain_multihead_attention():
    x = inputs()
    # 1 of 4 heads (of 8 dims) and 8 of 32 residual units: every width is 24
    groups = lambda dg: [in_proj_groups(dg)[0], dg.group_of("q_in.weight", 0)]  # noqa: E731
    dg, removal, pruned = run_oracle(build(), x, groups, fraction=0.25)
    assert type(pruned.attn) is nn.MultiheadAttention
    assert (pruned.attn.embed_dim, pruned.attn.num_heads) == (24, 3)


@torch.no_grad()
def test_equal_head_dims_keep_the_original_scale():
    dg, removal, pruned = run_oracle(build(), inputs(), lambda dg: in_proj_groups(dg)[1:], fraction=0.25)
    m = pruned.attn
    assert type(m) is PrunedMultiheadAttention and m.head_dim == 6 and m.scale == pytest.approx(8 ** -0.5)


@torch.no_grad()
def test_head_dims_pruned_apart_stay_decomposed():
    dg, removal, pruned = run_oracle(build(), inputs(), lambda dg: in_proj_groups(dg)[1:2], fraction=0.25)
    assert is_decomposed(pruned)  # q/k head dim 6, v head dim 8: no MultiheadAttention holds that
    assert pruned.attn.in_proj_weight.shape == (6 * 4 * 2 + 8 * 4, 32)


@torch.no_grad()
def test_apply_replay_and_iterative_pruning_keep_the_fused_module(tmp_path):
    model, x = build(), inputs(masks=True)
    pruned = fxprune.prune(model, 0.5, example_inputs=x, round_to=1, prune_head_dims=True)
    assert isinstance(pruned.attn, nn.MultiheadAttention) and not is_decomposed(pruned)
    pruned.meta["fxprune_plan"].save(tmp_path / "plan.json")
    again = fxprune.replay(tmp_path / "plan.json", model, x)
    assert type(again.attn) is type(pruned.attn)
    assert_close_to_scale(again(*x), pruned(*x))
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, prune_head_dims=True, round_to=1)
    first = pruner.step()
    final = pruner.step()  # re-analyses the PrunedMultiheadAttention: decomposed and put back again
    assert type(first.attn) is type(final.attn) is PrunedMultiheadAttention
    assert {n: p.shape for n, p in final.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}


@torch.no_grad()
def test_pruned_module_matches_its_parent_at_the_parents_widths():
    torch.manual_seed(0)
    for batch_first in (True, False):
        ref = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        m = PrunedMultiheadAttention(16, 4, 4, batch_first=batch_first).eval()
        m.load_state_dict(ref.state_dict())
        x, _, padding, mask = inputs(batch_first, masks=True)
        x = torch.randn(*x.shape[:2], 16)
        for need_weights in (True, False):
            kw = {"key_padding_mask": padding, "attn_mask": mask, "need_weights": need_weights}
            assert_close_to_scale(m(x, x, x, **kw), ref(x, x, x, **kw))
            y = torch.randn_like(x)  # key is value, query differs
            assert_close_to_scale(m(x, y, y, **kw), ref(x, y, y, **kw))


def test_pruned_module_round_trips_through_save_load_and_torch_save(tmp_path):
    model, x = build(), inputs()
    pruned = fxprune.prune(model, 0.5, example_inputs=x, round_to=1, prune_head_dims=True)
    assert type(pruned.attn) is PrunedMultiheadAttention
    fxprune.save(pruned, tmp_path / "saved")
    loaded = fxprune.load(tmp_path / "saved")
    torch.save(pruned, tmp_path / "pruned.pt")
    reloaded = torch.load(tmp_path / "pruned.pt", weights_only=False)
    with torch.no_grad():
        expected = pruned(*x)
        for other in (loaded, reloaded):
            assert type(other.attn) is PrunedMultiheadAttention and other.attn.out_dim == pruned.attn.out_dim
            assert torch.equal(other(*x), expected)


def test_training_mode_and_dropout_are_kept():
    model, x = build(), inputs()
    model.attn.dropout = 0.1
    model.train()
    pruned = {ratio: fxprune.prune(model, ratio, example_inputs=x, round_to=1, prune_head_dims=True) for ratio in (0.0, 0.5)}
    for ratio, cls in ((0.0, nn.MultiheadAttention), (0.5, PrunedMultiheadAttention)):
        assert type(pruned[ratio].attn) is cls and pruned[ratio].attn.training and pruned[ratio].attn.dropout == 0.1
    with torch.no_grad():
        assert_close_to_scale(pruned[0.0].eval()(*x), model.eval()(*x))


class Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, memory, key_padding_mask, attn_mask):
        return self.inner(x, memory, key_padding_mask, attn_mask)


@pytest.mark.parametrize("need_weights", [False, True])
@torch.no_grad()
def test_pruned_module_traces_and_is_pruned_again_inside_another_model(need_weights):
    x = inputs(masks=True)
    pruned = fxprune.prune(build(need_weights=need_weights), 0.5, example_inputs=x, round_to=1)
    traced = torch.fx.symbolic_trace(pruned)  # plain torch.fx traces through its forward
    assert_close_to_scale(traced(*x), pruned(*x))
    # fxprune's capture keeps it one call (a leaf), decomposes it, and puts it back smaller
    again = fxprune.prune(Holder(pruned), 0.3, example_inputs=x, round_to=1)
    assert type(again.inner.attn) is PrunedMultiheadAttention
    assert again.inner.attn.num_heads * again.inner.attn.head_dim < pruned.attn.num_heads * pruned.attn.head_dim


@pytest.mark.parametrize("masks", [False, True], ids=["no_mask", "masks"])
@pytest.mark.parametrize("variant", VARIANTS[::4], ids=lambda v: "-".join(f"{k}={int(x)}" for k, x in v.items()))
def test_shapes_of_a_decomposed_attention_are_the_full_propagations(variant, masks, monkeypatch):
    """Only the decomposed call's new nodes are propagated (``propagate_new``, without propagating the whole graph
    again): every node's shape must be the one a propagation of the whole graph gives."""
    from fxprune.analysis import propagate as module
    from fxprune.analysis.capture import capture
    from fxprune.analysis.decompose import decompose

    args = inputs(batch_first=variant["batch_first"], cross=variant["cross"], masks=masks)
    gm = capture(build(**variant), args)
    whole = module.propagate
    whole(gm, args)
    assert decompose(gm)
    new = [n for n in gm.graph.nodes if n.op not in ("output", "placeholder") and "val" not in n.meta]
    assert new  # the decomposition's nodes
    with monkeypatch.context() as m:
        m.setattr(module, "propagate", lambda *a: pytest.fail("propagate_new propagated the whole graph"))
        module.propagate_new(gm, args)
    assert all("val" in n.meta for n in new)
    shapes = lambda: {n.name: tuple(n.meta["val"].shape) for n in gm.graph.nodes  # noqa: E731
                      if isinstance(n.meta.get("val"), torch.Tensor)}
    incremental = shapes()
    whole(gm, args)
    assert incremental == shapes()
