"""Table test for fxprune/rules/recurrent.py: LSTM, GRU and RNN (layers, directions, states)."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import run_oracle


class Seq(nn.Module):
    def __init__(self, cls, use_state=False, **kwargs):
        super().__init__()
        self.use_state = use_state
        self.inp = nn.Linear(3, 4)
        self.rnn = cls(4, 5, **kwargs)
        width = 5 * (2 if kwargs.get("bidirectional") else 1)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        y, state = self.rnn(self.inp(x))
        if self.use_state == "lstm":  # (h, c): the cell state of the last layer
            return self.out(state[-1][-1])
        if self.use_state:  # the hidden state of the last layer
            return self.out(state[-1])
        return self.out(y)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_hidden_units_are_one_group_and_gate_blocks_are_frozen(cls, gates):
    dg = fxprune.analyze(Seq(cls, batch_first=True).eval(), (torch.randn(2, 3, 3),))
    inp = dg.group_of("inp.weight", 0)
    assert dg.group_of("rnn.weight_ih_l0", 1) is inp and inp.prunable and inp.units == 4
    hidden = dg.group_of("out.weight", 1)
    assert hidden.units == 5 and hidden.prunable
    assert dg.group_of("rnn.weight_hh_l0", 1) is hidden
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        parts = dg.groups_of(name, 0)
        if gates == 1:  # a one-gate RNN has no gate factor
            assert parts == [hidden], name
        else:
            assert [g.units for g in parts] == [gates, 5] and parts[1] is hidden, name
            assert any("RNN gate blocks" in w for w in parts[0].frozen)
    assert sorted(g.units for g in dg.prunable_groups) == [4, 5]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_prunes_exactly(cls):
    x = torch.randn(2, 3, 3)
    dg, removal, pruned = run_oracle(Seq(cls, batch_first=True), (x,), absolute=True)
    hidden = dg.group_of("out.weight", 1)
    kept = 5 - len(removal[hidden])
    assert pruned.rnn.hidden_size == kept and pruned.rnn.input_size == 4 - len(removal[dg.group_of("inp.weight", 0)])
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    assert tuple(pruned.rnn.weight_hh_l0.shape) == (gates * kept, kept)


def test_bidirectional_two_layer_gru():
    x = torch.randn(3, 2, 3)  # (S, B, F): not batch first
    dg = fxprune.analyze(Seq(nn.GRU, num_layers=2, bidirectional=True).eval(), (x,))
    hidden = dg.groups_of("rnn.weight_hh_l1_reverse", 0)[1]
    assert hidden.units == 5
    # each layer's output is forward ++ reverse: the next layer's input and the head's input
    assert dg.describe(dg.layout_of("rnn.weight_ih_l1", 1)) == f"(G{hidden.id}(5) ++ G{hidden.id}(5))"
    assert dg.groups_of("out.weight", 1) == [hidden]
    member = next(m for m in hidden.members if m.name == "out.weight")
    assert member.indices(hidden, [1]).tolist() == [1, 6]
    assert dg.group_of("rnn.weight_ih_l0_reverse", 1) is dg.group_of("inp.weight", 0)
    dg, removal, pruned = run_oracle(Seq(nn.GRU, num_layers=2, bidirectional=True), (x,), absolute=True)
    kept = 5 - len(removal[dg.groups_of("rnn.weight_hh_l1_reverse", 0)[1]])
    assert pruned.out.in_features == 2 * kept and pruned.rnn.weight_ih_l1.shape[1] == 2 * kept


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_final_state_shares_the_hidden_group(cls):
    x = torch.randn(2, 3, 3)
    use_state = "lstm" if cls is nn.LSTM else True
    dg = fxprune.analyze(Seq(cls, use_state=use_state, batch_first=True, num_layers=2).eval(), (x,))
    hidden = dg.group_of("out.weight", 1)
    assert dg.groups_of("rnn.weight_hh_l0", 0)[-1] is hidden
    assert dg.groups_of("rnn.weight_hh_l1", 0)[-1] is hidden  # one hidden_size for every layer
    # the state's first axis is layers x directions: frozen (``state[-1]`` makes the last layer a unit of its own)
    state = ("v", "rnn", (1, 1) if cls is nn.LSTM else (1,))
    assert dg.solver.final_atoms(dg.layouts[(state, 2)]) == [hidden.atom]
    layers = [next(g for g in dg.groups if g.atom == a) for a in dg.solver.final_atoms(dg.layouts[(state, 0)])]
    assert [g.units for g in layers] == [1, 1]
    assert all(any("RNN layers x directions" in w for w in g.frozen) for g in layers)
    assert any("integer index" in w for w in layers[-1].frozen)
    run_oracle(Seq(cls, use_state=use_state, batch_first=True, num_layers=2), (x,), absolute=True)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_with_projections_is_frozen():
    dg = fxprune.analyze(_proj(), (torch.randn(2, 3, 3),))
    g = dg.group_of("inp.weight", 0)
    assert g.frozen and any("LSTM with proj_size" in w for w in g.frozen)
    assert dg.prunable_groups == []


def _proj():
    model = Seq(nn.LSTM, batch_first=True)
    model.rnn = nn.LSTM(4, 6, proj_size=5, batch_first=True)
    return model.eval()
