"""Table test for fxprune/rules/routing.py: top-k, tensor indexing, index_put/index_add/scatter_add, histc and
grouped matmul, as mixture-of-experts blocks dispatch tokens (exact relations, then the dead-unit oracle)."""

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import exported, run_oracle

T, E, K = 5, 3, 2  # tokens, experts, experts per token


class Gathered(nn.Module):
    """A router picks K experts per token; a 3-d expert weight is indexed per (token, expert) pair (``W[ids]``),
    the rows are gathered (aten.index), multiplied, and added back per token (index_add)."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.out = nn.Linear(4, 6), nn.Linear(6, E), nn.Linear(5, 2)
        self.w = nn.Parameter(torch.randn(E, 5, 6))  # (experts, expert units, hidden)

    def forward(self, x):  # x: (T, 4)
        h = self.a(x)
        probs, ids = self.gate(h).softmax(-1).topk(K, dim=-1)  # (T, K)
        token = torch.arange(T).repeat_interleave(K)  # (T*K,)
        rows = h[token]  # aten.index: (T*K, 6)
        y = torch.bmm(self.w[ids.reshape(-1)], rows.unsqueeze(-1)).squeeze(-1)  # (T*K, 5)
        y = y * probs.reshape(-1, 1)
        return self.out(torch.zeros(T, 5).index_add(0, token, y))


def test_topk_index_and_index_add_relations():
    x = torch.randn(T, 4)
    gm = exported(Gathered().eval(), x)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.topk.default", "aten.index.Tensor", "aten.index_add.default"} <= ops
    dg = fxprune.analyze(gm, (x,))
    assert not dg.state.unsupported, dg.report()
    hidden = dg.group_of("a.weight", 0)  # carried through the gather h[token] into W's last axis
    assert hidden.units == 6 and hidden.prunable
    assert dg.group_of("gate.weight", 1) is hidden and dg.group_of("w", 2) is hidden
    units = dg.group_of("w", 1)  # the experts' units: through bmm, index_add and into out's input
    assert units.units == 5 and units.prunable and dg.group_of("out.weight", 1) is units
    # W[ids] reads the router's ids as positions along W's expert axis: router rows and W's experts are one group,
    # and top-k needs K of them
    experts = dg.group_of("gate.weight", 0)
    assert experts.units == E and experts.prunable and dg.group_of("w", 0) is experts
    assert experts.min_kept == K and experts.normalized  # softmax over the experts: removing one is not exact
    assert dg.group_of("getitem_1", 1).frozen  # the k axis of the ids


class OtherUse(Gathered):
    def forward(self, x):
        h = self.a(x)
        probs, ids = self.gate(h).topk(K, dim=-1)
        return self.out(torch.zeros(T, 5)) + ids.sum()  # the ids read as numbers: the experts stay


def test_topk_ids_read_as_numbers_freeze_the_ranked_axis():
    x = torch.randn(T, 4)
    dg = fxprune.analyze(exported(OtherUse().eval(), x), (x,))
    assert "top-k ranked axis" in dg.group_of("gate.weight", 0).frozen[0]


def test_removing_experts_matches_the_smaller_model_and_keeps_top_k():
    torch.manual_seed(0)
    model, x = Gathered().eval(), torch.randn(T, 4)
    dg = fxprune.analyze(exported(model, x), (x,))
    experts = dg.group_of("gate.weight", 0)
    smaller = copy.deepcopy(model)  # the same model built with experts 0 and 2 only
    with torch.no_grad():
        smaller.gate = nn.Linear(6, 2)
        smaller.gate.weight.copy_(model.gate.weight[[0, 2]])
        smaller.gate.bias.copy_(model.gate.bias[[0, 2]])
        smaller.w = nn.Parameter(model.w[[0, 2]].clone())
        pruned = fxprune.apply(dg, {experts: [1]})
        torch.testing.assert_close(pruned(x), smaller(x), atol=1e-6, rtol=0)
    assert pruned.w.shape == (2, 5, 6)
    with pytest.raises(fxprune.PlanError, match="must keep at least 2 of its 3 units"):
        fxprune.apply(dg, {experts: [0, 1]})


def test_topk_index_and_index_add_prune_exactly():
    x = torch.randn(T, 4)
    dg, _, _ = run_oracle(exported(Gathered().eval(), x), (x,), absolute=True, all_supported=True)
    assert {g.units for g in dg.prunable_groups} == {6, 5, E}  # the experts: prunable, not in the oracle


class Scattered(nn.Module):
    """index_select over tokens, index_put_ with accumulate, scatter_add with a full-width index, histc + cumsum
    counts (data: frozen), and a sort of the expert ids."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x, ids):  # x: (T, 4); ids: (T,) expert of each token
        h = self.a(x)
        order, perm = torch.sort(ids)
        rows = h.index_select(0, perm)  # (T, 6)
        counts = torch.histc(order.float(), bins=E, min=0, max=E - 1).cumsum(0)
        rows = self.b(rows) * counts[order].unsqueeze(-1)
        back = torch.zeros(T, 6).index_put_((perm,), rows, accumulate=True)
        spread = torch.zeros(T, 6).scatter_add(0, perm.unsqueeze(-1).expand(T, 6), rows)
        return self.out(back + spread)


def test_index_select_index_put_scatter_add_relations_and_oracle():
    x, ids = torch.randn(T, 4), torch.tensor([2, 0, 1, 0, 2])
    gm = exported(Scattered().eval(), x, ids)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.index_select.default", "aten.index_put_.default", "aten.scatter_add.default",
            "aten.histc.default", "aten.sort.default"} <= ops
    dg, _, _ = run_oracle(gm, (x, ids), absolute=True, all_supported=True)
    first = dg.group_of("a.weight", 0)  # gathered by index_select, carried into b
    assert first.units == 6 and first.prunable and dg.group_of("b.weight", 1) is first
    second = dg.group_of("b.weight", 0)  # index_put_ values and scatter_add's source/index (same width) into out
    assert second.units == 6 and second.prunable and dg.group_of("out.weight", 1) is second


def test_scatter_add_with_a_narrower_index_freezes_that_axis():
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            src = self.a(x)[:, :3]  # (T, 3): writes only the first 3 of 6 columns
            index = torch.zeros(T, 3, dtype=torch.long)
            return self.out(torch.zeros(T, 6).scatter_add(0, index, src))

    x = torch.randn(T, 4)
    dg = fxprune.analyze(exported(Narrow().eval(), x), (x,))
    assert "scattered by data" in dg.group_of("out.weight", 1).frozen[0]


class Grouped(nn.Module):
    """One grouped matmul over a 3-d expert weight, rows sorted by expert, offsets from histc + cumsum."""

    def __init__(self, fallback=False):
        super().__init__()
        self.fallback = fallback
        self.a, self.out = nn.Linear(4, 8), nn.Linear(12, 2)
        self.w = nn.Parameter(torch.randn(E, 8, 12))  # (experts, hidden, expert units)

    def forward(self, x, ids):
        order, perm = torch.sort(ids)
        rows = self.a(x)[perm]
        offs = torch.histc(order.float(), bins=E, min=0, max=E - 1).cumsum(0, dtype=torch.int32)
        if self.fallback:
            y = torch.ops.transformers.grouped_mm_fallback(rows, self.w, offs)
        else:
            y = torch.nn.functional.grouped_mm(rows, self.w, offs=offs)
        return self.out(y)


def _grouped_mm_runs() -> bool:
    try:
        w = torch.randn(2, 8, 12, dtype=torch.bfloat16)
        torch.nn.functional.grouped_mm(torch.randn(4, 8, dtype=torch.bfloat16), w, offs=torch.tensor([2, 4]).int())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("fallback", [False, True])
def test_grouped_mm_ties_the_contraction_and_the_expert_units(fallback):
    if fallback:
        pytest.importorskip("transformers.integrations.moe")  # registers torch.ops.transformers.grouped_mm_fallback
        if not hasattr(torch.ops.transformers, "grouped_mm_fallback"):
            pytest.skip("this transformers has no grouped_mm_fallback op")
    elif not _grouped_mm_runs():
        pytest.skip("no CPU grouped_mm in this torch")
    # torch's meta kernel of aten._grouped_mm takes bfloat16 only: that variant is related in bfloat16, unpruned
    dtype = torch.float32 if fallback else torch.bfloat16
    x, ids = torch.randn(T, 4, dtype=dtype), torch.tensor([2, 0, 1, 0, 2])
    gm = exported(Grouped(fallback).eval().to(dtype), x, ids)
    assert any("grouped_mm" in str(n.target) for n in gm.graph.nodes)
    if fallback:
        dg, _, _ = run_oracle(gm, (x, ids), absolute=True, all_supported=True)
    else:
        dg = fxprune.analyze(gm, (x, ids))
    assert not dg.state.unsupported, dg.report()
    assert dg.group_of("w", 0).frozen  # offsets counted from ids that no router ranked: the experts stay
    hidden = dg.group_of("a.weight", 0)
    assert hidden.units == 8 and hidden.prunable and dg.group_of("w", 1) is hidden
    units = dg.group_of("w", 2)
    assert units.units == 12 and units.prunable and dg.group_of("out.weight", 1) is units


class LeadingPut(nn.Module):
    """``y[:, idx] = v``: aten.index_put_ with indices ``[None, idx]``; v's leading axis is y's leading axis."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x, idx):  # x: (T, 4); idx: (3,) distinct positions
        y = torch.zeros(6, T)
        y[:, idx] = self.a(x)[:3].T  # (6, 3) into columns idx
        return self.out(y.T)


def test_index_put_ties_the_unindexed_leading_axis():
    x, idx = torch.randn(T, 4), torch.tensor([4, 0, 2])
    gm = exported(LeadingPut().eval(), x, idx)
    assert any("index_put" in str(n.target) for n in gm.graph.nodes)
    dg, _, _ = run_oracle(gm, (x, idx), absolute=True, all_supported=True)
    channels = dg.group_of("a.weight", 0)
    assert channels.units == 6 and channels.prunable and dg.group_of("out.weight", 1) is channels
