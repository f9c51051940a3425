"""LSTM, GRU and RNN: one hidden atom for every layer and direction (one ``hidden_size``).

Gate blocks are stacked along the weights' first axis, so ``weight_ih_l0[0]`` is
``product(gates, hidden)`` with a frozen gate atom: removing hidden unit u
removes row ``g * H + u`` of every gate g. A bidirectional layer's output is
``concat(hidden, hidden)`` (forward then reverse).
"""

from __future__ import annotations

import torch.nn as nn

from fxprune.algebra.layout import Cat
from fxprune.rules.registry import register

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@register(nn.LSTM, nn.GRU, nn.RNN)
def recurrent(r) -> None:
    m = r.module
    if getattr(m, "proj_size", 0):
        r.freeze_all("LSTM with proj_size")
        return
    x, out = r.input(0), r.output(0)
    gates = r.fresh(next(n for cls, n in GATES.items() if isinstance(m, cls)), f"RNN gates {r.where}")
    r.freeze(gates, "RNN gate blocks")
    hidden = r.fresh(m.hidden_size, f"RNN hidden units {r.where}")
    directions = ["", "_reverse"] if m.bidirectional else [""]
    layer_out = Cat(tuple(hidden for _ in directions))
    for layer in range(m.num_layers):
        for suffix in directions:
            name = f"l{layer}{suffix}"
            w_ih, w_hh = r.param(f"weight_ih_{name}"), r.param(f"weight_hh_{name}")
            r.product(w_ih[0], [gates, hidden])
            r.product(w_hh[0], [gates, hidden])
            r.same(w_hh[1], hidden)
            r.same(w_ih[1], x[-1] if layer == 0 else layer_out)
            for bias in (r.param(f"bias_ih_{name}"), r.param(f"bias_hh_{name}")):
                if bias is not None:
                    r.product(bias[0], [gates, hidden])
    for d in range(x.ndim - 1):
        r.same(x[d], out[d])
    r.same(out[-1], layer_out)
    states = [r.output(1)] if r.output(1) is not None else [r.output(1, 0), r.output(1, 1)]
    given = r.input(1)
    for state in [s for s in states if s is not None] + ([given] if given is not None else []):
        r.same(state[-1], hidden)
        r.freeze(state[0], "RNN layers x directions")
        if state.ndim == 3:
            r.same(state[1], out[0] if m.batch_first else out[1])
    r.module_attr("hidden_size", hidden)
    r.module_attr("input_size", x[-1])
