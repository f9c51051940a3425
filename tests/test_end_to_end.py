"""End to end: the worked example's groups, and the dead-unit oracle on the hard architectures.

The oracle cases: residual, DenseNet concat, YOLO C2f chunk, channel shuffle, grouped conv, flatten->linear,
hard-coded view->ConvTranspose2d, ViT attention with reshape/permute/unbind, LSTM, MultiheadAttention. The worked
example of docs/ARCHITECTURE.md is followed stage by stage in ``tests/test_docs.py``.
"""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.testing import oracle_groups, plant_dead_units, run_oracle
from tests import models


def test_worked_example_groups():
    dg = fxprune.analyze(models.WorkedExample(), (torch.randn(2, 3, 4, 4),), prune_head_dims=True)
    group_a, group_b = dg.groups_of("conv1.weight", 0)
    assert (group_a.units, group_b.units) == (2, 4)
    assert group_a.prunable and group_b.prunable
    for name, axis in [("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0),
                       ("bn1.running_mean", 0), ("conv2.weight", 0)]:
        assert dg.groups_of(name, axis) == [group_a, group_b], name
    # conv2's input channel axis is (G x Cin/G); its weight holds only the per-group part
    assert dg.groups_of("conv2.weight", 1) == [group_b]
    # fc.weight[1] = product(C, H, W): C is (A x B), H and W are spatial and frozen
    fc_groups = dg.groups_of("fc.weight", 1)
    assert fc_groups[:2] == [group_a, group_b]
    assert [g.units for g in fc_groups[2:]] == [4, 4] and all(g.frozen for g in fc_groups[2:])
    assert any("spatial" in why for why in fc_groups[2].frozen)
    # frozen: the input channels (graph input) and the logits (graph output)
    assert any("graph input" in why for why in dg.group_of("conv1.weight", 1).frozen)
    assert any("graph output" in why for why in dg.group_of("fc.weight", 0).frozen)
    assert {g.id for g in dg.prunable_groups} == {group_a.id, group_b.id}


def test_worked_example_removing_a_whole_conv_group_shrinks_groups():
    model = models.WorkedExample().eval()
    x = torch.randn(2, 3, 4, 4)
    dg = fxprune.analyze(model, (x,), prune_head_dims=True)
    group_a, group_b = dg.groups_of("conv1.weight", 0)
    pruned = fxprune.apply(dg, {group_a: [1], group_b: [0, 3]})
    assert pruned.conv2.groups == 1 and pruned.conv2.in_channels == 2 and pruned.conv2.out_channels == 2
    assert pruned.conv1.weight.shape == (2, 3, 3, 3) and pruned.fc.weight.shape == (10, 2 * 16)
    assert pruned(x).shape == (2, 10)


CASES = {
    "residual_cnn": (models.ResidualCNN, lambda: (torch.randn(2, 3, 8, 8),), 3),
    "densenet_concat": (models.DenseBlock, lambda: (torch.randn(2, 3, 8, 8),), 4),
    "yolo_c2f_chunk": (models.C2f, lambda: (torch.randn(2, 3, 8, 8),), 3),
    "channel_shuffle": (models.ChannelShuffle, lambda: (torch.randn(2, 3, 8, 8),), 2),
    "grouped_conv_4": (models.GroupedConv, lambda: (torch.randn(2, 3, 8, 8),), 3),
    "flatten_linear": (models.FlattenLinear, lambda: (torch.randn(2, 3, 8, 8),), 2),
    "hardcoded_view_deconv": (models.HardCodedDecoder, lambda: (torch.randn(2, 16),), 2),
    "vit_attention": (models.ViTBlock, lambda: (torch.randn(2, 5, 12),), 3),
    "lstm_linear": (models.LSTMHead, lambda: (torch.randn(2, 7, 6),), 1),
    "multihead_attention": (models.MHAModel, lambda: (torch.randn(2, 5, 10),), 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dead_unit_oracle(name):
    factory, inputs, min_groups = CASES[name]
    for seed in range(3):
        torch.manual_seed(seed)
        run_oracle(factory(), inputs(), seed=seed, min_groups=min_groups)


def test_vit_attention_heads_are_found_without_num_heads():
    dg = fxprune.analyze(models.ViTBlock(), (torch.randn(2, 5, 12),), prune_head_dims=True)
    qkv = dg.groups_of("attn.qkv.weight", 0)
    assert [g.units for g in qkv] == [3, 4, 8]  # (q/k/v) x heads x head_dim
    assert qkv[0].frozen and qkv[1].prunable and qkv[2].prunable
    assert dg.groups_of("attn.proj.weight", 1) == qkv[1:]
    pruned = fxprune.apply(dg, {qkv[1]: [0, 2]})
    assert pruned.attn.qkv.weight.shape == (3 * 2 * 8, 32)
    assert pruned(torch.randn(2, 5, 12)).shape == (2, 5, 5)


def test_multihead_attention_variants():
    for batch_first in (True, False):
        for need_weights in (True, False):
            torch.manual_seed(0)
            model = models.MHAModel(batch_first, need_weights)
            shape = (2, 5, 10) if batch_first else (5, 2, 10)
            dg, _, pruned = run_oracle(model, (torch.randn(*shape),), min_groups=3)
            heads = dg.groups_of("attn.in_proj_weight", 0)
            assert [g.units for g in heads[:2]] == [4, 8]


def test_hardcoded_view_constant_is_rewritten():
    model = models.HardCodedDecoder().eval()
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 16),), round_to=1)
    assert pruned.deconv1.in_channels == 128
    assert "128, 4, 4" in pruned.code
    assert pruned(torch.randn(3, 16)).shape == (3, 3, 16, 16)  # -1 stays symbolic: other batch sizes work


def test_lstm_hidden_units_are_one_group_across_layers_and_directions():
    dg = fxprune.analyze(models.LSTMHead(), (torch.randn(2, 7, 6),), prune_head_dims=True)
    gates, hidden = dg.groups_of("lstm.weight_ih_l0", 0)
    assert gates.units == 4 and gates.frozen and hidden.units == 12
    assert dg.groups_of("lstm.weight_hh_l1_reverse", 1) == [hidden]
    assert dg.groups_of("fc.weight", 1) == [hidden]
    assert dg.describe(dg.layout_of("fc.weight", 1)) == f"(G{hidden.id}(12) ++ G{hidden.id}(12))"  # fwd ++ reverse
    pruned = fxprune.prune(models.LSTMHead(), 0.5, example_inputs=(torch.randn(2, 7, 6),), round_to=1)
    assert pruned.lstm.hidden_size == 6 and pruned.lstm.weight_ih_l1.shape == (24, 12)


def test_plant_dead_units_indexes_on_the_parameters_device():
    """The planted indices follow each tensor's device (a CUDA model; here the meta device, which is as strict)."""
    with torch.device("meta"):
        model = models.ResidualCNN()
    dg = fxprune.analyze(model, (torch.empty(2, 3, 8, 8, device="meta"),))
    removal = plant_dead_units(dg)
    assert len(removal) == len(oracle_groups(dg)) > 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_multihead_attention_pooling_head_under_export():
    with pytest.warns(UserWarning, match="captured with torch.export"):
        dg, _, pruned = run_oracle(models.MHAPoolExported(), (torch.randn(2, 5, 6),), min_groups=3)
    assert dg.gm.meta.get("fxprune_capture") == "export"
    assert any(n.target is torch.ops.aten.bmm.default for n in dg.gm.graph.nodes)
    assert dg.group_of("attn.out_proj.weight", 0).prunable and dg.group_of("proj.weight", 0).prunable
