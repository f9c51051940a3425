"""The CI subset of the torchvision sweep (benchmarks/torchvision_sweep.py runs the whole zoo).

Each model (``weights=None``, eval mode, a small input) must prune at ratio 0.5
with its 1000 logits kept, run, keep its output shape, keep at most half of its
MACs, and pass the dead-unit oracle: removing planted all-zero units changes the
output by at most 1e-5 of its magnitude.

Also vit_b_16's attention put back as an ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import pytest
import torch

import fxprune
import fxprune.analysis.macs
from fxprune.modules import PrunedMultiheadAttention
from fxprune.testing import assert_close_to_scale, oracle_groups, plant_dead_units, run_oracle

torchvision = pytest.importorskip("torchvision")

# name: (input size, constructor kwargs); each is (about) the smallest size the model accepts cheaply
CASES = {
    "resnet18": (64, {}),
    "mobilenet_v3_small": (64, {}),
    "densenet121": (64, {}),
    "shufflenet_v2_x0_5": (64, {}),
    "regnet_x_400mf": (64, {}),
    "vit_b_16": (32, {"image_size": 32}),
    "convnext_tiny": (64, {}),
    "efficientnet_b0": (64, {}),
    "squeezenet1_0": (64, {}),
    "swin_t": (64, {}),
}


def randomize_constant_params(model: torch.nn.Module) -> None:
    """Random values for parameters initialised to one constant.

    torchvision zero-initialises ViT's ``heads.head`` and starts ConvNeXt's layer
    scales at 1e-6, which would make the oracle compare near-constant outputs.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                c = float(p.flatten()[0])
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(0.2 * noise if abs(c) <= 1e-3 else c * (1 + 0.2 * noise))


def build(name: str):
    size, kwargs = CASES[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_constant_params(model)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_prune_half_and_oracle(name):
    model, x = build(name)
    expected = model(x)

    pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    out = pruned(x)
    assert out.shape == expected.shape == (1, 1000)
    assert torch.isfinite(out).all()
    macs, params = fxprune.analysis.macs.count(model, (x,))
    macs_pruned, params_pruned = fxprune.analysis.macs.count(pruned, (x,))
    assert macs_pruned <= 0.5 * macs, f"{name} keeps {macs_pruned / macs:.1%} of its MACs"
    assert params_pruned < params

    # the dead-unit oracle, on the same (untouched) model: plant zero units, remove exactly them
    dg = fxprune.analyze(model, (x,))
    assert not dg.state.unsupported, [where for _, where in dg.state.unsupported]
    removal = plant_dead_units(dg, seed=0)
    assert removal, f"{name}: no group the oracle can check"
    before = model(x)
    after = fxprune.apply(dg, removal)(x)
    scale = before.abs().max()
    torch.testing.assert_close(after / scale, before / scale, atol=1e-5, rtol=0)


class _RelativeBias(torch.nn.Module):
    """MaxViT's relative position bias: ``table[idx]`` gathers rows; the heads axis stays prunable."""

    def __init__(self, dim=16, heads=4, window=3):
        super().__init__()
        self.heads, self.n = heads, window * window
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.table = torch.nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", torch.randint(0, (2 * window - 1) ** 2, (self.n * self.n,)))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(self.n, self.n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))


@torch.no_grad()
def test_gathered_relative_bias_keeps_heads_prunable():
    dg, _, pruned = run_oracle(_RelativeBias(), (torch.randn(2, 9, 16),), lambda dg: dg.groups_of("table", 1),
                               fraction=0.5, prune_head_dims=False, absolute=True)
    heads = dg.groups_of("table", 1)
    assert len(heads) == 1 and heads[0].prunable and heads[0].units == 4
    assert dg.groups_of("table", 0)[0].frozen
    assert pruned.table.shape == (25, 2)


def _attentions(model) -> list:
    return [m for name, m in model.named_modules() if name.endswith("self_attention")]


@torch.no_grad()
def test_vit_attention_is_a_multihead_attention_again():
    """Decomposed for analysis, put back after pruning: the native MultiheadAttention path still runs."""
    model, x = build("vit_b_16")
    same = fxprune.prune(model, 0.0, example_inputs=(x,))
    assert [type(m) for m in _attentions(same)] == [torch.nn.MultiheadAttention] * 12
    assert_close_to_scale(same(x), model(x))
    half = fxprune.prune(model, 0.5, example_inputs=(x,))  # 6 heads of 64 and a residual of 384: they fit
    assert all(type(m) is torch.nn.MultiheadAttention and m.num_heads == 6 for m in _attentions(half))
    third = fxprune.prune(model, 0.3, example_inputs=(x,), round_to=1)  # 8 heads, residual 538: the subclass
    assert all(type(m) is PrunedMultiheadAttention and m.num_heads == 8 for m in _attentions(third))

    def heads_and_mlp(dg):  # head dims are left out: q/k and v head dims pruned apart stay decomposed
        head_dims = {g for name, _ in dg.gm.named_parameters() if name.endswith("in_proj_weight")
                     for g in dg.groups_of(name, 0)[1:]}
        return [g for g in oracle_groups(dg) if g not in head_dims]

    dg, removal, pruned = run_oracle(model, (x,), heads_and_mlp)
    heads = [len(removal.get(dg.groups_of(f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", 0)[0],
                             ())) for i in range(12)]
    assert all(heads)
    assert [m.num_heads for m in _attentions(pruned)] == [12 - h for h in heads]
    assert all(type(m) is PrunedMultiheadAttention for m in _attentions(pruned))
