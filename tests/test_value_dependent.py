"""Forwards that read tensor values: ``.item()``, ``nonzero``, ``unique``, masks from the data.

FakeTensor cannot give such nodes a shape; propagation runs them (and only what they need) for real on the
example inputs, marks them and warns once. The rules that follow: a boolean mask keeps the axes it does not
mask prunable (``mask_select``), and ops whose result is values read as data freeze with that reason.
About 6 s on 2 shared cores.

Example::

    python -m pytest -q tests/test_value_dependent.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ShapeError
from fxprune.analysis.propagate import propagate
from fxprune.testing import assert_same_outputs, exported, plant_dead_units
from tests.models import CachesOnSelf, ReadsValues

X = (1, 3, 8, 8)


def _graph(model, x, capture: str):
    return exported(model, x) if capture == "export" else model


@pytest.mark.parametrize("capture", ["trace", "export"])
def test_nodes_that_read_values_run_for_real_and_are_named(capture):
    torch.manual_seed(0)
    model, x = ReadsValues().eval(), torch.randn(X)
    with pytest.warns(UserWarning, match=r"3 node\(s\) read tensor values.*models.py:\d+: .*\.item\(\)"):
        dg = fxprune.analyze(_graph(model, x, capture), (x,))
    read = dg.gm.meta["fxprune_value_dependent"]
    mask = "getitem" if capture == "trace" else "index"
    assert read == ["item", mask, "nonzero"]
    nodes = {n.name: n for n in dg.gm.graph.nodes}
    assert all("fxprune_concrete" in nodes[name].meta for name in read)
    assert "fxprune_concrete" not in nodes["x"].meta
    # the masked rows: as many as the real forward keeps
    pixels = torch.relu(model.conv(x))
    pixels = (model.mix(pixels).clamp(max=x.abs().amax().item()) + pixels).flatten(2).transpose(1, 2)
    assert nodes[mask].meta["val"].shape == pixels[pixels.amax(-1) > 0.1].shape
    assert nodes["item"].meta["val"] == pytest.approx(x.abs().amax().item())


@pytest.mark.parametrize("capture", ["trace", "export"])
def test_dead_units_behind_value_reads_prune_exactly(capture):
    torch.manual_seed(0)
    model, x = ReadsValues().eval(), torch.randn(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = fxprune.analyze(_graph(model, x, capture), (x,))
    channels = dg.group_of("conv.weight", 0)
    assert channels.prunable and channels.units == 8 and dg.group_of("fc.weight", 1) is channels
    removal = plant_dead_units(dg, [channels], fraction=0.5)
    before = dg.gm(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.apply(dg, removal)  # verify propagates again: no second warning
    assert not [w for w in caught if "read tensor values" in str(w.message)]
    assert pruned.get_parameter("conv.weight").shape[0] == 4
    assert_same_outputs(pruned(x), before)
    other = torch.randn(X)  # other values: other row counts, computed by the graph at run time
    assert_same_outputs(pruned(other), dg.gm(other))


def test_a_mask_freezes_the_axes_it_masks_and_carries_the_others():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x, keep):
            return self.b(self.a(x)[keep])  # (B, T, 6)[(B, T)] -> (N, 6)

    x, keep = torch.randn(2, 5, 4), torch.tensor([[True, False, True, True, False]] * 2)
    for model in (Masked(), exported(Masked(), x, keep)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = fxprune.analyze(model, (x, keep))
        mask = next(n.name for n in dg.gm.graph.nodes if n.meta.get("fxprune_concrete"))
        hidden = dg.group_of("a.weight", 0)
        assert hidden.prunable and hidden.units == 6
        assert dg.group_of(mask, 1) is hidden and dg.group_of("b.weight", 1) is hidden
        assert any("positions a mask picked" in why for why in dg.group_of(mask, 0).frozen)
        assert any("indexed by a mask" in why for why in dg.group_of("keep", 1).frozen)
        assert dg.gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape == (2, 5, 4)
    assert Masked()(x, keep).shape == (6, 3)  # the real op once: N = 6 kept positions


@pytest.mark.parametrize("op", ["nonzero", "unique"])
def test_values_read_as_data_freeze_with_their_reason(op):
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            picked = h.nonzero() if op == "nonzero" else torch.unique(h.round())
            return self.b(h) + picked.shape[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = fxprune.analyze(Reads().eval(), (torch.randn(2, 4),))
    hidden = dg.group_of("a.weight", 0)
    assert not hidden.prunable and any(f"values read as data ({op})" in why for why in hidden.frozen), hidden.frozen
    assert "ops without a rule" not in dg.report()


def test_value_reads_need_real_example_inputs():
    gm = torch.fx.symbolic_trace(ReadsValues())
    with pytest.raises(ShapeError, match=r"node 'item' .* reads tensor values.*needs real tensors"):
        propagate(gm, (torch.Size(X),))


def test_running_for_real_leaves_the_models_buffers_alone():
    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            pooled = self.bn(self.conv(x)).mean((2, 3))
            return pooled[pooled.amax(1) > -1]  # train mode: the real run updates batch statistics (of a copy)

    model, x = Counts().train(), torch.randn(X)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.analyze(model, (x,))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training
