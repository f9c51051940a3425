"""In place for any ``nn.Module`` (:mod:`fxprune.rewriting.inplace`): the caller's own object is pruned, its own
forward is checked against the pruned graph, or it is put back bit for bit with a clear error.

Each model is compared with the graph the same plan gives without ``inplace`` (the plan replayed on a copy taken
before), at the example's batch of one and at a batch of three (the graph run one example at a time).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.rewriting.inplace import Snapshot, write_into
from fxprune.testing import assert_in_place_matches_graph, assert_same_modules, forward_flops, module_snapshot
from tests import models


def _pruned_both_ways(model, inputs, ratio=0.3, **options):
    """``(graph, FLOPs before)``: ``model`` pruned in place, and the graph its plan gives on a copy taken before."""
    original, cls = copy.deepcopy(model), type(model)
    before = forward_flops(model, inputs)
    assert fxprune.prune(model, ratio, example_inputs=inputs, inplace=True, **options) is model
    assert type(model) is cls
    graph = fxprune.replay(fxprune.plan_of(model), original, inputs, inplace=False)
    return graph, before


@pytest.mark.parametrize("build", [models.timm_vit, models.diffusers_unet, models.open_clip_vit],
                         ids=["timm_vit", "diffusers_unet", "open_clip_vit"])
def test_other_libraries_models_are_pruned_in_place(build, no_network):
    """timm's ViT (symbolic_trace; head counts from the rewritten reshape), diffusers' UNet (torch.export: the
    graph shares no module with the caller; Upsample2D's asserted ``channels`` follow), open_clip's tower
    (``nn.MultiheadAttention`` resized, its ``LayerNorm`` subclass and bare class/position parameters)."""
    model, x = build()
    graph, before = _pruned_both_ways(model, x)
    assert_in_place_matches_graph(model, graph, x)
    assert forward_flops(model, x) < 0.85 * before


@pytest.mark.parametrize("build", [models.ViTBlock, models.LSTMHead, lambda: models.MHAModel(batch_first=False),
                                   models.MHAPoolExported, models.ResidualCNN],
                         ids=["vit_block", "lstm", "mha_sequence_first", "mha_pool_exported", "residual_cnn"])
def test_small_models_are_pruned_in_place(build):
    """A head count read in forward (``self.heads``), an LSTM's sizes, ``nn.MultiheadAttention`` captured both ways
    (heads pruned apart from the width it is called with: a ``PrunedMultiheadAttention`` takes its place)."""
    torch.manual_seed(0)
    model = build().eval()
    shapes = {models.ViTBlock: (1, 5, 12), models.LSTMHead: (1, 7, 6), models.ResidualCNN: (1, 3, 16, 16)}
    x = (torch.randn(shapes.get(type(model), (1, 5, 10) if isinstance(model, models.MHAModel) else (1, 4, 6))),)
    if isinstance(model, models.MHAModel):
        x = (torch.randn(5, 1, 10),)  # (sequence, batch, features): its first axis is no batch
    graph, _ = _pruned_both_ways(model, x, 0.5, round_to=1)
    if isinstance(model, models.MHAModel):
        with torch.no_grad():
            fxprune.testing.assert_close_to_scale(model(*x), graph(*x), atol=1e-4)
    else:
        assert_in_place_matches_graph(model, graph, x)
    if isinstance(model, models.ViTBlock):
        assert model.attn.heads == 2 and model.attn.qkv.out_features == 48
    if isinstance(model, models.MHAPoolExported):
        assert isinstance(model.attn, fxprune.modules.PrunedMultiheadAttention) or model.attn.num_heads == 1


def test_a_forward_that_hard_codes_a_width_is_a_clear_error_and_the_model_is_put_back():
    """``view(-1, 256, 4, 4)`` in the caller's forward cannot follow the pruned width: the error names the line
    and says the pruned graph works; every module's attributes, tables and tensors are the very same objects."""
    torch.manual_seed(0)
    model = models.HardCodedDecoder().eval()
    z = (torch.randn(1, 16),)
    state = module_snapshot(model)
    with pytest.raises(fxprune.FxPruneError, match=r"(?s)in place failed \(the model was put back as it was\).*"
                                                   r"models.py:\d+: x = F.relu\(self.fc\(z\)\).view\(-1, 256, 4, 4\)"
                                                   r".*inplace=False\) returns the pruned graph"):
        fxprune.prune(model, 0.5, example_inputs=z, inplace=True, round_to=1)
    assert_same_modules(model, state)
    assert fxprune.prune(model, 0.5, example_inputs=z, round_to=1)(*z).shape == (1, 3, 16, 16)  # the graph works


class _HardCodedInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).view(-1, 16))  # a width written into the code


class _WrapsHardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Linear(4, 12), nn.Linear(12, 8)
        self.inner, self.head = _HardCodedInside(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.inner(self.mid(F.relu(self.stem(x)))))


def test_a_submodule_that_hard_codes_a_width_keeps_its_widths_and_the_rest_is_pruned():
    """The failure is inside a submodule's own forward: its widths stay whole (a warning names the line) and the
    plan is made again over the rest, which the model can hold."""
    torch.manual_seed(0)
    model = _WrapsHardCoded().eval()
    x = (torch.randn(1, 4),)
    with pytest.warns(UserWarning, match=r"groups with tensors in inner keep all their units.*view\(-1, 16\)"):
        graph, _ = _pruned_both_ways(model, x, 0.5, round_to=1)
    assert model.inner.fc1.out_features == 16 and model.stem.out_features == 6
    assert_in_place_matches_graph(model, graph, x)


class _ReadsAStaleCount(nn.Module):
    """A channel count kept in an attribute and read in forward, where no op shows it and no tensor of its own
    module restates it by itself: in place, the check fails and names the attribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
        self.width = 16

    def forward(self, x):
        y = F.relu(self.conv(x)).mean((2, 3))
        return self.head(y.reshape(y.shape[0], self.width))


def test_the_error_names_an_attribute_that_still_holds_an_old_width(monkeypatch):
    import fxprune.rewriting.inplace.mechanism as mechanism

    # as if neither the graph, nor its value, nor the failing run could tell what the attribute becomes
    monkeypatch.setattr(mechanism, "follow_widths", lambda *args, **kwargs: {})
    monkeypatch.setattr(mechanism, "decide_from_constants", lambda *args, **kwargs: set())
    monkeypatch.setattr(mechanism, "_MAX_TRIES", 0)
    model = _ReadsAStaleCount().eval()
    x = (torch.randn(1, 3, 8, 8),)
    with pytest.raises(fxprune.FxPruneError, match=r"attributes still holding an old width: width = 16 \(pruned to 8"):
        fxprune.prune(model, 0.5, example_inputs=x, inplace=True, round_to=1)
    assert model.width == 16 and model.conv.out_channels == 16


def test_an_attribute_only_the_source_reads_follows_the_width():
    """The same model unpatched: ``self.width`` is an argument of the graph's reshape, so it follows."""
    model = _ReadsAStaleCount().eval()
    x = (torch.randn(1, 3, 8, 8),)
    fxprune.prune(model, 0.5, example_inputs=x, inplace=True, round_to=1)
    assert model.width == 8 == model.conv.out_channels == model.head.in_features


def test_the_check_refuses_a_pruned_graph_that_cannot_run_on_the_models_inputs():
    """Nothing to compare with is an error, never a check skipped in silence; the model is left as it was."""
    model = models.ResidualCNN().eval()
    x = (torch.randn(1, 3, 16, 16),)
    dg = fxprune.analyze(model, x, inplace=True)
    pruned = fxprune.apply(dg, {dg.prunable_groups[0]: [0]})

    def refuses(*args, **kwargs):
        raise TypeError("forward() takes 2 positional arguments but 3 were given")

    pruned.forward = refuses  # a graph that takes its inputs otherwise
    state = module_snapshot(model)
    with pytest.raises(fxprune.FxPruneError, match="the pruned graph does not run on the model's own inputs"):
        write_into(model, dg.gm, pruned, x)
    assert_same_modules(model, state)


def test_outputs_of_another_shape_fail_the_check_and_the_model_is_put_back():
    """Shapes that differ are a failed comparison (issue 18: never a comparison skipped because shapes differ),
    and so is another number of output tensors; the model is left as it was."""
    model = models.ResidualCNN().eval()
    x = (torch.randn(1, 3, 16, 16),)
    dg = fxprune.analyze(model, x, inplace=True)
    pruned = fxprune.apply(dg, {dg.prunable_groups[0]: [0]})
    shape = tuple(pruned(*x).shape)
    state = module_snapshot(model)
    for other, message in ((lambda *a: torch.zeros(shape[0], shape[1] + 1), r"output \(the tensor\): shape"),
                           (lambda *a: (torch.zeros(shape), torch.zeros(shape)), r"returns 1 tensors .* returns 2")):
        pruned.forward = other
        with pytest.raises(fxprune.FxPruneError, match=r"(?s)computes something else than the pruned graph.*"
                                                       + message):
            write_into(model, dg.gm, pruned, x)
        assert_same_modules(model, state)


class _UnregisteredWeight(nn.Module):
    """A weight kept in a plain list, which no module registers: a graph captures it as a constant of its own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.weights = [torch.randn(4, 16)]

    def forward(self, x):
        return F.linear(F.relu(self.fc(x)), self.weights[0])


def test_a_model_whose_pruned_tensors_it_does_not_hold_raises_rather_than_staying_unchanged():
    model = _UnregisteredWeight().eval()
    x = (torch.randn(1, 8),)
    state = module_snapshot(model)
    with pytest.raises(fxprune.FxPruneError, match="does not hold under those names"):
        fxprune.prune(model, 0.5, example_inputs=x, inplace=True, round_to=1)
    assert_same_modules(model, state)


def test_a_graph_module_pruned_in_place_takes_the_pruned_graph():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(models.ViTBlock().eval())
    x = (torch.randn(1, 5, 12),)
    graph, _ = _pruned_both_ways(gm, x, 0.5, round_to=1)
    assert_in_place_matches_graph(gm, graph, x)


def test_training_mode_checks_leave_running_statistics_alone():
    """The check runs the model in its own mode: BatchNorm's running statistics get their values back."""
    torch.manual_seed(0)
    model = models.ResidualCNN().train()
    fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 3, 16, 16),), inplace=True, round_to=1)
    assert model.training
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_snapshot_puts_back_swapped_modules_tables_and_attributes():
    model = models.MHAModel()
    saved = Snapshot(model)
    model.attn = nn.Identity()
    model.fc.weight = nn.Parameter(torch.zeros(3, 8))
    model.fc.in_features = 8
    model.extra = 1
    assert set(saved.changed()) == {"", "fc"}
    saved.restore()
    assert isinstance(model.attn, nn.MultiheadAttention) and model.fc.weight.shape == (3, 32)
    assert model.fc.in_features == 32 and not hasattr(model, "extra") and saved.changed() == []


def test_siglip_attention_pooling_head_is_pruned_in_place():
    """SigLIP's vision model ends in an attention-pooling head (``nn.MultiheadAttention`` over a learnt probe):
    its heads are pruned apart from the hidden width, which ``nn.MultiheadAttention`` cannot hold, so a
    ``PrunedMultiheadAttention`` over the same tensors takes its place (issue 18)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    model = transformers.SiglipVisionModel(config).eval()
    x = (torch.randn(1, 3, 32, 32),)
    graph, before = _pruned_both_ways(model, x)
    assert isinstance(model.head.attention, fxprune.modules.PrunedMultiheadAttention)
    with torch.no_grad():
        fxprune.testing.assert_close_to_scale(model(*x).pooler_output, graph(*x).pooler_output, atol=1e-4)
    assert forward_flops(model, x) < 0.85 * before


def test_a_latency_target_in_place_records_its_search_on_the_model():
    """``target_latency`` with ``inplace=True``: the search's record goes on the caller's model (it has no graph
    ``meta``), as its plan does. Only what was recorded is asserted: the timings are the shared machine's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = (torch.randn(8, 64),)
    assert fxprune.prune(model, target_latency=0.7, example_inputs=x, inplace=True) is model
    assert model.fxprune_latency["target"] == 0.7 and len(model.fxprune_latency["tries"]) >= 1
    assert fxprune.plan_of(model).inplace and model(*x).shape == (8, 10)


def test_refit_and_batchnorm_reestimation_in_place_give_the_graphs_weights():
    """``reconstruct``, ``sequential`` and ``reestimate_bn`` write into the caller's model by parameter name: it
    then computes what the same call without ``inplace`` returns."""
    torch.manual_seed(0)
    model = models.ResidualCNN().eval()
    original = copy.deepcopy(model)
    x = (torch.randn(1, 3, 16, 16),)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    options = dict(example_inputs=x, calibration=batches, reconstruct=True, sequential=True, reestimate_bn=True,
                   round_to=1)
    assert fxprune.prune(model, 0.5, inplace=True, **options) is model
    graph = fxprune.prune(original, 0.5, **options)
    with torch.no_grad():
        fxprune.testing.assert_close_to_scale(model(*x), graph(*x), atol=1e-4)
        assert not torch.allclose(model.eval()(*x), original(*x), atol=1e-3)  # pruned and refit: not the original


def test_timm_vit_with_eager_attention_is_pruned_in_place(no_network):
    """timm's unfused attention (``TIMM_FUSED_ATTN=0``, as Torch-Pruning's timm example sets it): the scores pass
    through ``maybe_add_mask``, a function the tracer keeps whole, between the matmul and the softmax; the heads
    are still found there and ``num_heads`` follows."""
    model, x = models.timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    graph, before = _pruned_both_ways(model, x)
    assert_in_place_matches_graph(model, graph, x)
    assert model.blocks[0].attn.num_heads * model.blocks[0].attn.head_dim == model.blocks[0].attn.qkv.out_features // 3
