"""Table test for fxprune/rules/linear.py: nn.Linear, F.linear, matmul / mm / bmm / @, addmm, einsum."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import run_oracle


class Mlp(nn.Module):
    """nn.Linear, then F.linear with explicit weights, on a 3-d input."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.w2 = nn.Parameter(torch.randn(5, 6))
        self.b2 = nn.Parameter(torch.randn(5))
        self.fc3 = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        y = F.relu(self.fc1(x))
        y = F.relu(F.linear(y, self.w2, self.b2))
        return self.fc3(y)


def test_linear_relations():
    dg = fxprune.analyze(Mlp().eval(), (torch.randn(2, 7, 4),), prune_head_dims=True)
    h1, h2 = dg.group_of("fc1.weight", 0), dg.group_of("w2", 0)
    assert (h1.units, h2.units) == (6, 5)
    assert dg.group_of("fc1.bias", 0) is h1 and dg.group_of("w2", 1) is h1 and dg.group_of("fc1", 2) is h1
    assert dg.group_of("b2", 0) is h2 and dg.group_of("fc3.weight", 1) is h2 and dg.group_of("linear", 2) is h2
    # the leading (batch, sequence) axes carry through to the output
    assert dg.group_of("x", 0) is dg.group_of("fc3", 0) and dg.group_of("x", 1) is dg.group_of("fc3", 1)
    assert "graph input" in dg.group_of("fc1.weight", 1).frozen[0]
    assert "graph output" in dg.group_of("fc3.weight", 0).frozen[0]
    assert {g.id for g in dg.prunable_groups} == {h1.id, h2.id}
    assert {m.name for m in h1.parameters} == {"fc1.weight", "fc1.bias", "w2"}


def test_linear_prunes_and_resizes_features():
    x = torch.randn(2, 7, 4)
    dg, removal, pruned = run_oracle(Mlp(), (x,), absolute=True)
    h1, h2 = dg.group_of("fc1.weight", 0), dg.group_of("w2", 0)
    assert pruned.fc1.out_features == 6 - len(removal[h1])
    assert tuple(pruned.w2.shape) == (5 - len(removal[h2]), 6 - len(removal[h1]))
    assert pruned.fc3.in_features == 5 - len(removal[h2])


class Matmuls(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4, 5))  # a @ w: 4 is the contraction
        self.c = nn.Parameter(torch.randn(5))  # addmm's added input broadcasts onto the product
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        y = self.a(x)
        if self.form == "@":
            z = y @ self.w
        elif self.form == "matmul":
            z = torch.matmul(y, self.w)
        elif self.form == "method":
            z = y.matmul(self.w)
        elif self.form == "mm":
            z = torch.mm(y, self.w)
        else:
            z = torch.addmm(self.c, y, self.w)
        return self.out(torch.relu(z))


@pytest.mark.parametrize("form", ["@", "matmul", "method", "mm", "addmm"])
def test_matmul_contraction_and_output_axes(form):
    dg = fxprune.analyze(Matmuls(form).eval(), (torch.randn(2, 3),), prune_head_dims=True)
    k, n = dg.group_of("a.weight", 0), dg.group_of("out.weight", 1)
    assert (k.units, n.units) == (4, 5) and k is not n
    assert dg.group_of("w", 0) is k and dg.group_of("w", 1) is n
    assert k.prunable and n.prunable
    if form == "addmm":
        assert dg.group_of("c", 0) is n
    run_oracle(Matmuls(form), (torch.randn(2, 3),), absolute=True)


class BatchedAttentionScores(nn.Module):
    """bmm and a broadcasting matmul: (B, N, D) @ (B, D, N), then (B, N, N) @ (B, N, D)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.k = nn.Linear(4, 6)
        self.v = nn.Linear(4, 3)
        self.o = nn.Linear(3, 4)

    def forward(self, x):
        s = torch.bmm(self.q(x), self.k(x).transpose(1, 2))
        return self.o(s @ self.v(x))


def test_bmm_ties_q_and_k_but_not_v():
    x = torch.randn(2, 5, 4)
    dg = fxprune.analyze(BatchedAttentionScores().eval(), (x,), prune_head_dims=True)
    qk, v = dg.group_of("q.weight", 0), dg.group_of("v.weight", 0)
    assert (qk.units, v.units) == (6, 3)
    assert dg.group_of("k.weight", 0) is qk and dg.group_of("o.weight", 1) is v
    # scores are (B, N, N): both N axes are the sequence of x, frozen as a graph input axis
    assert dg.group_of("bmm", 1) is dg.group_of("bmm", 2) is dg.group_of("x", 1)
    assert dg.group_of("bmm", 0) is dg.group_of("x", 0)
    run_oracle(BatchedAttentionScores(), (x,), absolute=True)


class Einsums(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 6))  # "bi,ih->bh"
        self.w2 = nn.Parameter(torch.randn(2, 3, 6))  # "...h,gdh->...gd" : 6 -> (2 x 3)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(torch.einsum("bi,ih->bh", x, self.w1))
        z = torch.einsum("...h,gdh->...gd", h, self.w2)
        return self.out(z.flatten(-2))


def test_einsum_letters_tie_axes():
    dg = fxprune.analyze(Einsums().eval(), (torch.randn(3, 4),), prune_head_dims=True)
    h = dg.group_of("w1", 1)
    assert h.units == 6 and dg.group_of("w2", 2) is h
    g, d = dg.group_of("w2", 0), dg.group_of("w2", 1)
    assert (g.units, d.units) == (2, 3)
    assert dg.groups_of("out.weight", 1) == [g, d]
    assert dg.group_of("einsum_1", 1) is g and dg.group_of("einsum_1", 2) is d
    assert "graph input" in dg.group_of("w1", 0).frozen[0]
    assert sorted(x.units for x in dg.prunable_groups) == [2, 3, 6]
    dg, removal, pruned = run_oracle(Einsums(), (torch.randn(3, 4),), absolute=True)
    assert len(removal) == 3
    assert tuple(pruned.w2.shape) == tuple(n - len(removal[dg.group_of("w2", i)]) for i, n in enumerate((2, 3, 6)))


def test_matrix_vector_products():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.v = nn.Parameter(torch.randn(4))
            self.u = nn.Parameter(torch.randn(4))
            self.m = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            y = torch.relu(self.a(x))  # (B, 4)
            return (y @ self.v).unsqueeze(-1) + (self.u @ self.m) + (self.v @ self.u) + y @ self.m

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),), prune_head_dims=True)
    g = dg.group_of("a.weight", 0)
    assert g.units == 4 and g.prunable
    for name, axis in (("v", 0), ("u", 0), ("m", 0)):
        assert dg.group_of(name, axis) is g, name
    run_oracle(M(), (torch.randn(2, 3),), absolute=True)
