"""Table test for fxprune/rules/misc.py: embedding, size()/shape/dim() metadata, tensor attributes (.T)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import run_oracle


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 6)
        self.pos = nn.Parameter(torch.randn(7, 4))  # used through F.embedding
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        B, S = ids.size()
        positions = ids.new_zeros(ids.shape) + ids.size(1) - 1 - ids.dim()  # (B, S) of small ints
        h = self.fc(self.tok(ids)) + F.embedding(positions.clamp(0, 6), self.pos)
        return self.head(h.view(B, S, -1))


def test_embedding_ties_the_feature_axis_and_freezes_the_vocabulary():
    ids = torch.randint(0, 10, (2, 5))
    dg = fxprune.analyze(Embeddings().eval(), (ids,))
    d, h = dg.group_of("tok.weight", 1), dg.group_of("pos", 1)
    assert (d.units, h.units) == (6, 4)
    assert dg.group_of("fc.weight", 1) is d and dg.group_of("tok", 2) is d
    assert dg.group_of("fc.weight", 0) is h and dg.group_of("head.weight", 1) is h
    assert dg.group_of("tok", 0) is dg.group_of("ids", 0) and dg.group_of("tok", 1) is dg.group_of("ids", 1)
    for name in ("tok.weight", "pos"):
        assert any("vocabulary" in w for w in dg.group_of(name, 0).frozen), name
    # size(), shape and dim() state no relation, and are not unsupported ops
    assert dg.state.unsupported == []
    assert sorted(g.units for g in dg.prunable_groups) == [4, 6]


def test_embedding_prunes_exactly():
    ids = torch.randint(0, 10, (2, 5))
    dg, removal, pruned = run_oracle(Embeddings(), (ids,), absolute=True)
    d, h = dg.group_of("tok.weight", 1), dg.group_of("pos", 1)
    assert pruned.tok.embedding_dim == 6 - len(removal[d]) and tuple(pruned.tok.weight.shape)[0] == 10
    assert tuple(pruned.pos.shape) == (7, 4 - len(removal[h]))
    assert "view(getitem, getitem_1, -1)" in pruned.code


class Transposes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(5, 4))  # used as w.T: (4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) @ self.w.T))


def test_dot_T_is_a_matrix_transpose():
    dg = fxprune.analyze(Transposes().eval(), (torch.randn(2, 3),))
    k, n = dg.group_of("a.weight", 0), dg.group_of("b.weight", 1)
    assert dg.group_of("w", 1) is k and dg.group_of("w", 0) is n
    assert dg.group_of("getattr_1", 0) is k and dg.group_of("getattr_1", 1) is n
    run_oracle(Transposes(), (torch.randn(2, 3),), absolute=True)


def test_unknown_tensor_attribute_freezes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).real)

    dg = fxprune.analyze(M().eval(), (torch.randn(2, 3),))
    g = dg.group_of("a.weight", 0)
    assert any("tensor attribute .real" in w for w in g.frozen)
    assert dg.prunable_groups == []
