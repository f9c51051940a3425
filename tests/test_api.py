"""The public API: argument checking, clear errors, no side effects, save/reload, meta device, ignore, round_to."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from tests import models


def _inputs():
    return (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_ratio_outside_range_is_a_value_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        fxprune.prune(models.ResidualCNN(), ratio, example_inputs=_inputs())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot follow it
            return self.fc(x)
        return x


def test_untraceable_model_names_the_line_and_suggests_export():
    with pytest.raises(fxprune.CaptureError) as info:
        fxprune.prune(DataDependent(), 0.5, example_inputs=(torch.randn(2, 4),))
    message = str(info.value)
    assert "test_api.py" in message and "if x.sum() > 0" in message
    assert "torch.export" in message


def test_missing_example_inputs_is_a_clear_error():
    with pytest.raises(fxprune.ShapeError, match="example_inputs"):
        fxprune.analyze(models.ResidualCNN())


def test_graph_module_with_shape_metadata_needs_no_inputs():
    gm = fx.symbolic_trace(models.ResidualCNN())
    fxprune.analyze(gm, _inputs())  # leaves node.meta["val"] on the caller's graph? It must not.
    assert all("val" not in n.meta for n in gm.graph.nodes)
    from fxprune.propagate import propagate
    propagate(gm, _inputs())
    dg = fxprune.analyze(gm)
    assert len(dg.prunable_groups) == 3


def test_a_group_never_loses_all_units():
    dg = fxprune.analyze(models.ResidualCNN(), _inputs())
    group = dg.prunable_groups[0]
    with pytest.raises(fxprune.PlanError, match="at least one"):
        fxprune.apply(dg, {group: range(group.units)})
    pruned = fxprune.prune(models.ResidualCNN(), 0.99, example_inputs=_inputs())
    assert pruned.get_submodule("stem.0").out_channels == 1


def test_frozen_group_cannot_be_pruned():
    dg = fxprune.analyze(models.ResidualCNN(), _inputs())
    frozen = dg.group_of("head.weight", 0)
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.apply(dg, {frozen: [0]})


def test_original_model_and_graph_module_are_untouched():
    model = models.ResidualCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.prune(model, 0.5, example_inputs=_inputs())
    assert pruned.get_submodule("stem.0").out_channels == 8
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem[0].out_channels == 16
    gm = fx.symbolic_trace(model)
    code = gm.code
    fxprune.prune(gm, 0.5, example_inputs=_inputs())
    assert gm.code == code and gm.get_submodule("stem.0").weight.shape[0] == 16


def test_inplace_resizes_the_callers_modules():
    model = models.ResidualCNN().eval()
    fxprune.prune(model, 0.5, example_inputs=_inputs(), inplace=True)
    assert model.stem[0].out_channels == 8 and model.stem[0].weight.shape == (8, 3, 3, 3)


def test_pruned_model_saves_and_reloads():
    model = models.ChannelShuffle().eval()
    x = _inputs()
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*x), pruned(*x))


def test_state_dict_loads_into_a_regenerated_copy():
    model = models.ViTBlock().eval()
    x = (torch.randn(2, 5, 12),)
    dg = fxprune.analyze(model, x)
    removal = {g: [0] for g in dg.prunable_groups}
    pruned = fxprune.apply(dg, removal)
    with torch.no_grad():
        for p in pruned.parameters():  # pretend it was fine-tuned
            p.add_(0.01)
    fresh = fxprune.apply(fxprune.analyze(models.ViTBlock(), x), removal_by_id(removal))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), pruned(*x))


def removal_by_id(removal):
    return {g.id: units for g, units in removal.items()}


def test_meta_device_model_is_analysed_without_weights():
    with torch.device("meta"):
        model = models.ResidualCNN()
    dg = fxprune.analyze(model, (torch.empty(2, 3, 8, 8, device="meta"),))
    assert len(dg.prunable_groups) == 3
    pruned = fxprune.apply(dg, {g: [0] for g in dg.prunable_groups})
    assert pruned.get_submodule("stem.0").weight.device.type == "meta" and pruned.get_submodule("stem.0").out_channels == 15


class ModeRegions(nn.Module):
    """A no_grad and an autocast(enabled=False) region on the hidden units, as LLaMA's rotary embedding has."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            s = h.sigmoid() * self.scale
        with torch.autocast("cpu", enabled=False):
            s = s * 2
        return self.b(h * s)


@pytest.mark.parametrize("exported_by", ["fxprune", "caller"])
def test_grad_and_autocast_regions_of_an_exported_graph_are_analysed(exported_by):
    # torch.export wraps both regions in higher-order ops over submodules (wrap_with_set_grad_enabled,
    # wrap_with_autocast) when grad is enabled; no rule sees inside them unless capture inlines them
    from fxprune.capture import export_capture
    from fxprune.testing import plant_dead_units
    from tests.test_rules_extra import _exported

    model, x = ModeRegions().eval(), (torch.randn(2, 4),)
    gm = export_capture(model, x) if exported_by == "fxprune" else _exported(model, *x)
    dg = fxprune.analyze(gm, x)
    assert not dg.state.unsupported, dg.report()
    (hidden,) = dg.prunable_groups
    assert hidden.units == 8
    assert {("a.weight", 0), ("scale", 0), ("b.weight", 1)} <= {(m.name, m.dim) for m in hidden.members}
    removal = plant_dead_units(dg)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.apply(dg, removal)(*x), model(*x), atol=1e-6, rtol=0)


def test_ignore_by_module_name_and_parameter():
    x = _inputs()
    model = models.ResidualCNN()
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=["stem.0"])
    assert pruned.get_submodule("stem.0").out_channels == 16 and pruned.get_submodule("block.0").out_channels == 12
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=[model.down])
    assert pruned.down.out_channels == 32 and pruned.down.in_channels == 16
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=["block.0.weight"])
    assert pruned.get_submodule("block.0").out_channels == 24 and pruned.get_submodule("stem.0").out_channels == 16
    with pytest.raises(ValueError, match="no parameter"):
        fxprune.prune(model, 0.5, example_inputs=x, ignore=["nonexistent"])


def test_round_to_keeps_multiples():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 3))
    pruned = fxprune.prune(model, 0.3, example_inputs=(torch.randn(2, 8),), round_to=8)
    assert pruned.get_submodule("0").out_features == 48 and pruned.get_submodule("2").out_features == 32  # 28 kept, rounded to 32
    with pytest.raises(ValueError, match="round_to"):
        fxprune.prune(model, 0.3, example_inputs=(torch.randn(2, 8),), round_to=0)


def test_importance_l2_removes_the_smallest_units():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(6.0).repeat(4, 1).T + 1)
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    pruned = fxprune.prune(copy.deepcopy(model), 0.5, example_inputs=(torch.randn(2, 4),))
    # units 0, 1, 2 have the smallest norms; 3, 4, 5 survive
    torch.testing.assert_close(pruned.get_submodule("0").weight, model[0].weight[3:])


def mystery(x):
    return x * 2


torch.fx.wrap("mystery")


def test_report_lists_groups_and_unsupported_ops():
    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(mystery(self.a(x)))

    dg = fxprune.analyze(Uses(), (torch.randn(2, 4),))
    text = dg.report()
    assert "ops without a rule" in text and "mystery" in text and "test_api.py" in text
    assert dg.group_of("a.weight", 0).frozen and not dg.prunable_groups
