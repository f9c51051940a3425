"""The public API: argument checking, clear errors, no side effects, save/reload, meta device, ignore, round_to."""

from __future__ import annotations

import copy
import importlib
import io
import warnings
from collections import OrderedDict

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
        fxprune.prune(models.ResidualCNN(), ratio, example_inputs=_inputs(), round_to=1)


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
        fxprune.prune(DataDependent(), 0.5, example_inputs=(torch.randn(2, 4),), round_to=1)
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
    from fxprune.analysis.propagate import propagate
    propagate(gm, _inputs())
    dg = fxprune.analyze(gm)
    assert len(dg.prunable_groups) == 3


def test_a_group_never_loses_all_units():
    dg = fxprune.analyze(models.ResidualCNN(), _inputs())
    group = dg.prunable_groups[0]
    with pytest.raises(fxprune.PlanError, match="at least one"):
        fxprune.apply(dg, {group: range(group.units)})
    pruned = fxprune.prune(models.ResidualCNN(), 0.99, example_inputs=_inputs(), round_to=1)
    assert pruned.get_submodule("stem.0").out_channels == 1


def test_frozen_group_cannot_be_pruned():
    dg = fxprune.analyze(models.ResidualCNN(), _inputs())
    frozen = dg.group_of("head.weight", 0)
    with pytest.raises(fxprune.PlanError, match="frozen"):
        fxprune.apply(dg, {frozen: [0]})


def test_original_model_and_graph_module_are_untouched():
    model = models.ResidualCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.prune(model, 0.5, example_inputs=_inputs(), round_to=1)
    assert pruned.get_submodule("stem.0").out_channels == 8
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem[0].out_channels == 16
    gm = fx.symbolic_trace(model)
    code = gm.code
    fxprune.prune(gm, 0.5, example_inputs=_inputs(), round_to=1)
    assert gm.code == code and gm.get_submodule("stem.0").weight.shape[0] == 16


def test_inplace_resizes_the_callers_modules():
    model = models.ResidualCNN().eval()
    fxprune.prune(model, 0.5, example_inputs=_inputs(), inplace=True, round_to=1)
    assert model.stem[0].out_channels == 8 and model.stem[0].weight.shape == (8, 3, 3, 3)


def test_pruned_model_saves_and_reloads():
    model = models.ChannelShuffle().eval()
    x = _inputs()
    pruned = fxprune.prune(model, 0.5, example_inputs=x, round_to=1)
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
    from fxprune.analysis.capture import export_capture
    from fxprune.testing import exported, plant_dead_units

    model, x = ModeRegions().eval(), (torch.randn(2, 4),)
    gm = export_capture(model, x) if exported_by == "fxprune" else exported(model, *x)
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
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=["stem.0"], round_to=1)
    assert pruned.get_submodule("stem.0").out_channels == 16 and pruned.get_submodule("block.0").out_channels == 12
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=[model.down], round_to=1)
    assert pruned.down.out_channels == 32 and pruned.down.in_channels == 16
    pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=["block.0.weight"], round_to=1)
    assert pruned.get_submodule("block.0").out_channels == 24 and pruned.get_submodule("stem.0").out_channels == 16
    with pytest.raises(ValueError, match="no parameter"):
        fxprune.prune(model, 0.5, example_inputs=x, ignore=["nonexistent"], round_to=1)


def test_ignore_a_module_without_tensors_warns_and_changes_nothing():
    """An ``nn.Identity`` head (a timm model built with num_classes=0) has nothing to keep: by module or by name,
    ``ignore`` says so and the model is pruned as without it; a name of nothing still fails."""
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 32), act=nn.ReLU(), fc2=nn.Linear(32, 6), head=nn.Identity()))
    x = (torch.randn(1, 8),)
    plain = fxprune.prune(model, 0.5, example_inputs=x, round_to=1)
    for item in (model.head, "head"):
        with pytest.warns(UserWarning, match=r"ignore: module 'head' \(Identity\) has no parameters or buffers, so "
                                             r"there is nothing of it to keep"):
            pruned = fxprune.prune(model, 0.5, example_inputs=x, ignore=[item], round_to=1)
        assert pruned.get_submodule("fc1").out_features == plain.get_submodule("fc1").out_features == 16
        with torch.no_grad():
            torch.testing.assert_close(pruned(*x), plain(*x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no parameter or buffer named 'heads'"):
        fxprune.prune(model, 0.5, example_inputs=x, ignore=["heads"])


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
    pruned = fxprune.prune(copy.deepcopy(model), 0.5, example_inputs=(torch.randn(2, 4),), round_to=1)
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


class Mysterious(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(mystery(self.b(mystery(self.a(x)))))


def test_prune_warns_once_with_the_frozen_reasons_when_it_removes_less_than_asked():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(Mysterious(), 0.3, example_inputs=(torch.randn(2, 4),))
    messages = [str(w.message) for w in caught if "fxprune removed" in str(w.message)]
    assert len(messages) == 1 and issubclass(caught[0].category, UserWarning)
    assert messages[0].startswith("fxprune removed 0% of the parameters where ratio 0.3 was asked: 4 groups frozen: "
                                  "no rule for this op (4 groups), e.g. node 'mystery' (call_function mystery) at ")
    assert "test_api.py" in messages[0]
    assert pruned.a.out_features == 8


@pytest.mark.parametrize("model,ratio", [(Mysterious(), 0.0), (models.ResidualCNN(), 0.3), (models.ResidualCNN(), 0.05)])
def test_prune_does_not_warn_when_it_removes_what_was_asked(model, ratio):
    x = (torch.randn(2, 4),) if isinstance(model, Mysterious) else _inputs()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxprune removed")
        fxprune.prune(model, ratio, example_inputs=x, round_to=1)


def test_prune_says_when_alignment_holds_back_what_was_asked():
    with pytest.warns(UserWarning, match=r"removed 0% .* keep more units so that their widths stay multiples of 8"):
        fxprune.prune(models.ResidualCNN(), 0.05, example_inputs=_inputs())  # 16-32 channels lose 8 at a time


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x, y, scale=2.0):
        return self.c(torch.relu(self.a(x)) + torch.relu(self.b(y)) * scale)


@pytest.mark.parametrize("how", ["kwargs", "dict", "mixed"])
def test_keyword_and_dict_example_inputs_on_a_traced_model(how):
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    args, kwargs = {"kwargs": ((), {"x": x, "y": y}), "dict": ({"x": x, "y": y}, None),
                    "mixed": ((x,), {"y": y})}[how]
    model = TwoInputs().eval()
    dg = fxprune.analyze(model, args, kwargs=kwargs)
    assert dg.group_of("a.weight", 0) is dg.group_of("b.weight", 0) and dg.group_of("a.weight", 0).prunable
    pruned = fxprune.prune(model, 0.5, example_inputs=args, kwargs=kwargs, round_to=1)
    assert pruned.a.out_features == 4 and pruned(x=x, y=y).shape == (2, 2)


def test_unknown_or_missing_keyword_inputs_are_clear_errors():
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    with pytest.raises(fxprune.ShapeError, match="no keyword argument 'z'.*x, y, scale"):
        fxprune.analyze(TwoInputs(), (x,), kwargs={"y": y, "z": y})
    with pytest.raises(fxprune.ShapeError, match="no example input for TwoInputs's input 'y'"):
        fxprune.analyze(TwoInputs(), (), kwargs={"x": x})


class BranchesOnRank(nn.Module):
    """``if x.dim() == 3`` makes symbolic_trace fail, so capture falls back to torch.export (new module objects)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 6)
        self.head = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 2)])
        self.unused = nn.Linear(2, 2)  # export drops what forward never touches

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        y = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head[0](y) + self.head[1](y).sum(-1, keepdim=True)


@pytest.mark.parametrize("which", ["module", "module list", "name", "unused"])
def test_ignore_resolves_the_callers_modules_after_an_export_fallback(which):
    model, x = BranchesOnRank().eval(), torch.randn(2, 4)
    item = {"module": model.b, "module list": model.head, "name": "head", "unused": "unused"}[which]
    with pytest.warns(UserWarning, match="captured with torch.export"):
        dg = fxprune.analyze(model, (x,), ignore=[item])
    assert dg.gm.meta.get("fxprune_capture") == "export"
    b_out, head_units = dg.group_of("b.weight", 0), dg.group_of("head.1.weight", 0)
    assert b_out.prunable is (which not in ("module", "module list", "name"))
    assert head_units.prunable is (which in ("module", "unused"))
    if which != "unused":
        assert any("ignored by the caller" in why for why in b_out.frozen)


def test_ratios_resolve_the_callers_modules_after_an_export_fallback():
    model, x = BranchesOnRank().eval(), torch.randn(2, 4)
    with pytest.warns(UserWarning, match="captured with torch.export"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(x,), ratios={model.a: 0.25, model.b: 0.0}, round_to=1)
    assert pruned.get_parameter("a.weight").shape[0] == 6 and pruned.get_parameter("b.weight").shape[0] == 6


def test_ignore_a_timm_head_after_an_export_fallback():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10).eval()  # TF "same" padding
    with pytest.warns(UserWarning, match="captured with torch.export"):
        dg = fxprune.analyze(model, (torch.randn(1, 3, 32, 32),), ignore=[model.conv_head])
    assert dg.gm.meta.get("fxprune_capture") == "export"
    assert any("ignored by the caller (conv_head)" in why for why in dg.group_of("conv_head.weight", 0).frozen)


def test_ignore_a_head_without_tensors_warns_and_prunes():
    """timm's EVA-02 tiny has an ``nn.Identity`` head (num_classes=0): ``ignore=[model.get_classifier()]``, as a
    user writes it for any timm model, has nothing to keep; it says so and prunes, as the same call without it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=28, depth=1).eval()
    x = torch.randn(1, 3, 28, 28)
    assert isinstance(model.get_classifier(), nn.Identity)
    for item in (model.get_classifier(), "head"):
        with pytest.warns(UserWarning, match=r"ignore: module 'head' \(Identity\) has no parameters or buffers"):
            pruned = fxprune.prune(model, 0.3, example_inputs=(x,), ignore=[item])
        assert sum(p.numel() for p in pruned.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
        assert pruned(x).shape == model(x).shape == (1, 192)
    with pytest.raises(ValueError, match="no parameter or buffer named 'heads'"):  # a name of nothing still fails
        fxprune.prune(model, 0.3, example_inputs=(x,), ignore=["heads"])


def test_a_capture_that_must_be_static_warns_and_says_so_in_meta(monkeypatch):
    def no_dynamic_shapes(*args, **kwargs):
        raise ValueError("simulated: no dynamic shapes for this model")

    monkeypatch.setattr(importlib.import_module("fxprune.analysis.capture"), "_by_signature", no_dynamic_shapes)
    with pytest.warns(UserWarning, match="BranchesOnRank captured with static shapes on x dimension 0 .batch. = 2"
                                         ".*simulated"):
        pruned = fxprune.prune(BranchesOnRank().eval(), 0.5, example_inputs=(torch.randn(2, 4),))
    why = "dynamic export failed: ValueError: simulated: no dynamic shapes for this model"
    assert pruned.meta["fxprune_static_shapes"] == why
    assert pruned.meta["fxprune_input_shapes"]["dims"] == [{"input": "x", "placeholder": "x", "axis": 0, "role": "batch",
                                                       "size": 2, "static": True}]
    with pytest.raises(fxprune.ShapeError, match="x dimension 0 .batch. is 3, but this graph was captured for 2 only"):
        pruned(torch.randn(3, 4))


def test_attributes_the_user_set_on_modules_survive_pruning(tmp_path):
    model, x = models.ResidualCNN().eval(), _inputs()
    model.my_tag, model.block.my_tag, model.block[0].my_tag, model.head.my_tag = "root", "block", "conv", "head"
    pruned = fxprune.prune(model, 0.5, example_inputs=x, round_to=1)
    tags = lambda m: (m.my_tag, m.block.my_tag, m.get_submodule("block.0").my_tag, m.head.my_tag)  # noqa: E731
    assert tags(pruned) == ("root", "block", "conv", "head")
    assert pruned.code and pruned.get_submodule("block.0").out_channels < 24  # the GraphModule's own stay its own
    pruner = fxprune.Pruner(model, x, ratio=0.5, steps=2, round_to=1)
    pruner.step()
    assert tags(pruner.step()) == ("root", "block", "conv", "head")  # a GraphModule re-captured keeps them too
    fxprune.save(pruned, tmp_path / "saved")
    assert tags(fxprune.load(tmp_path / "saved")) == ("root", "block", "conv", "head")


def test_shapes_are_propagated_again_for_a_graph_the_caller_exported():
    # the caller's graph was exported from other inputs (batch 1) than it is analysed with (batch 3): its shapes
    # are not reused (a graph fxprune exports itself from the analysed inputs keeps them: tests/test_hf_families.py)
    from fxprune.testing import exported

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    gm = exported(model, torch.randn(1, 8))
    dg = fxprune.analyze(gm, (torch.randn(3, 8),))
    assert dg.expected_shapes == [(3, 4)]
    assert dg.group_of("0.weight", 0).units == 16
