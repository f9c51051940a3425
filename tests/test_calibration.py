"""Calibration on activations (fxprune.calibration): statistics against brute force, the activation and
wanda criteria, and the least-squares reconstruction checked by a redundant-unit oracle.

Checked: activation statistics against brute force (Linear, addmm with an (in, out) weight, ``x @ W``, ``x @ W.T``;
tensor, tuple and dict batches; traced, exported and functional graphs; 1-d, 2-d, 3-d and grouped convolution
patches against one-hot-kernel convolutions, per-block Gram matrices); the redundant-unit oracle (hypothesis: units
that copy kept units or are constant are pruned with ``reconstruct`` and the outputs do not change, on an MLP, a
LayerNorm MLP block with residual, Conv-BatchNorm CNNs in 1-d and 2-d, a grouped conv consumer and GPT-2-style
Conv1D layers); the dead-unit oracle with ``activation`` and ``wanda`` (also grouped/1-d convs and addmm); the
digits MLP whose output error ``reconstruct=True`` lowers; tiny GPT-2 (its Conv1D consumers calibrated) and
``reconstruct=True, inplace=True`` on tiny LLaMA and BERT (generate, save/reload, lower output error); ``obs`` in
the dead-unit oracle and against the brute-force refit error (random statistics with and without a bias; conv
channels of 9 columns, flattened channels of 16, Linear units of 1), a copied unit scoring ~0 under ``obs`` but not
``activation``, and ``obs`` + ``reconstruct`` taking one pass over the batches.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
import fxprune.testing
from fxprune.calibration import (OBS, calibrated_consumers, collect_statistics, damped_inverse, obs_scores,
                                 reconstruct, refit)
from fxprune.importance import resolve_importance, score_groups
from fxprune.testing import assert_close_to_scale, assert_same_outputs, exported, plant_dead_units
from tests.models import MLP, Conv1D, plant_redundant_units, tanh_cnn


class FunctionalMLP(nn.Module):
    """The consumer as ``F.linear`` over a bare parameter (no module)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.w2, self.b2 = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(2))

    def forward(self, x):
        return F.linear(torch.tanh(self.fc1(x)), self.w2, self.b2)


class Block(nn.Module):
    """An attention-free transformer-style block: x + fc2(gelu(fc1(norm(x)))), tokens (B, T, d)."""

    producer, consumer = "fc1", "fc2"

    def __init__(self, d=6, hidden=12):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.sample = (3, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Conv (strided, unpadded: a constant channel stays constant in every patch)."""

    producer, consumer = "conv1", "conv2"

    def __init__(self, c_in=2, hidden=6, c_out=3, dilation=1, dims=2, groups=1):
        super().__init__()
        conv, norm = [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d)][dims - 1]
        self.conv1, self.bn = conv(c_in, hidden, 3, padding=1), norm(hidden)
        self.conv2 = conv(hidden, c_out, 3, stride=2, dilation=dilation, groups=groups)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2)
        self.sample, self.blocks = (c_in,) + (7,) * dims, groups

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class AddmmMLP(nn.Module):
    """Two GPT-2 Conv1D layers: the consumer's input axis is its weight's axis 0."""

    producer, consumer, producer_axis, consumer_axis = "fc1", "fc2", 1, 0

    def __init__(self, d_in=3, hidden=5, d_out=2):
        super().__init__()
        self.fc1, self.act, self.fc2 = Conv1D(d_in, hidden), nn.Tanh(), Conv1D(hidden, d_out)
        self.sample = (d_in,)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MatmulMLP(nn.Module):
    """The consumer as ``h @ W`` (W: (in, out)) or, ``transposed``, ``h @ W.T`` (W: (out, in), as Falcon)."""

    def __init__(self, transposed=False):
        super().__init__()
        self.fc1, self.transposed = nn.Linear(3, 5), transposed
        self.w2 = nn.Parameter(torch.randn(2, 5) if transposed else torch.randn(5, 2))

    def forward(self, x):
        return torch.tanh(self.fc1(x)) @ (self.w2.T if self.transposed else self.w2)


def _hidden(model, x):
    """The consumer's input, computed by hand."""
    if isinstance(model, Block):
        return F.gelu(model.fc1(model.norm(x)))
    return model.act(model.fc1(x)) if isinstance(model, (MLP, AddmmMLP)) else torch.tanh(model.fc1(x))


def _as_batches(xs, kind):
    return {"tensor": list(xs), "tuple": [(x,) for x in xs], "dict": [{"x": x} for x in xs]}[kind]


# capture: (model, consumer weight, its input axis); "-exported": through torch.export (aten ops)
CONSUMERS = {
    "traced": (MLP, "fc2.weight", 1), "exported": (MLP, "fc2.weight", 1), "functional": (FunctionalMLP, "w2", 1),
    "addmm": (AddmmMLP, "fc2.weight", 0), "addmm-exported": (AddmmMLP, "fc2.weight", 0),
    "matmul": (MatmulMLP, "w2", 0), "matmul-exported": (MatmulMLP, "w2", 0),
    "transposed": (lambda: MatmulMLP(transposed=True), "w2", 1),
    "transposed-exported": (lambda: MatmulMLP(transposed=True), "w2", 1),
}


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("capture", list(CONSUMERS))
def test_statistics_equal_brute_force(kind, capture):
    torch.manual_seed(0)
    make, weight, axis = CONSUMERS[capture]
    model = make().eval()
    xs = [torch.randn(n, 3) for n in (4, 7, 1)]
    analysed = exported(model, xs[0]) if capture.endswith("exported") else model
    dg = fxprune.analyze(analysed, (xs[0],))
    assert {name: c.in_axis for name, c in calibrated_consumers(dg).items()} == {weight: axis}
    stats = collect_statistics(dg, _as_batches(xs, kind), gram=True)[weight]
    with torch.no_grad():
        h = torch.cat([_hidden(model, x) for x in xs]).double()
    h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    assert stats.count == 12
    torch.testing.assert_close(stats.mean, h.mean(0))
    torch.testing.assert_close(stats.var, h.var(0, unbiased=False))
    torch.testing.assert_close(stats.gram, h1.T @ h1 / len(h))


class FunctionalConv(nn.Module):
    """A consumer convolution as ``F.conv2d`` with ``padding="same"`` and a dilation."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.w2 = nn.Parameter(torch.randn(3, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(torch.tanh(self.conv1(x)), self.w2, padding="same", dilation=2)


@pytest.mark.parametrize("capture", ["traced", "exported", "functional"])
def test_convolution_statistics_are_patch_statistics(capture):
    """A convolution consumer's inputs are its unfolded patches (channel-major, kh * kw per channel)."""
    torch.manual_seed(0)
    model = (FunctionalConv() if capture == "functional" else CNN(dilation=2)).eval()
    xs = [torch.randn(n, 2, 7, 7) for n in (2, 3)]
    analysed = exported(model, xs[0]) if capture == "exported" else model
    dg = fxprune.analyze(analysed, (xs[0],))
    weight = "w2" if capture == "functional" else "conv2.weight"
    stats = collect_statistics(dg, xs, gram=True)[weight]
    with torch.no_grad():
        if capture == "functional":
            hidden, unfold = [torch.tanh(model.conv1(x)) for x in xs], dict(kernel_size=3, dilation=2, padding=2)
        else:
            hidden = [torch.relu(model.bn(model.conv1(x))) for x in xs]
            unfold = dict(kernel_size=3, dilation=2, stride=2)
    patches = torch.cat([F.unfold(h, **unfold).transpose(1, 2).reshape(-1, 4 * 9 if capture == "functional"
                                                                          else 6 * 9) for h in hidden]).double()
    p1 = torch.cat([patches, torch.ones(len(patches), 1, dtype=patches.dtype)], 1)
    assert stats.count == len(patches)
    torch.testing.assert_close(stats.var, patches.var(0, unbiased=False))
    torch.testing.assert_close(stats.gram, p1.T @ p1 / len(patches))


def _brute_patches(h, kernel, groups=1, **conv):
    """Patches as a convolution with one-hot kernels (channel-major, then kernel positions): another way than
    the library's ``Tensor.unfold``."""
    c, k = h.shape[1], int(np.prod(kernel))
    eye = torch.eye(k, dtype=h.dtype).reshape(k, 1, *kernel).repeat(c, 1, *[1] * len(kernel))
    out = getattr(F, f"conv{len(kernel)}d")(h, eye, groups=c, **conv)  # (N, C * k, *positions)
    return out.flatten(2).transpose(1, 2).reshape(-1, c * k)


@pytest.mark.parametrize("dims, groups, capture", [(1, 1, "traced"), (1, 1, "exported"), (3, 1, "traced"),
                                                   (2, 2, "traced"), (2, 2, "exported"), (3, 3, "exported")])
def test_conv_1d_3d_grouped_statistics_are_patch_statistics(dims, groups, capture):
    """1-d and 3-d convolutions' features are patches too; a grouped convolution keeps one Gram matrix per
    block of input channels (its mean and variance cover every feature)."""
    torch.manual_seed(0)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
    options = dict(stride=2, padding=1, dilation=1) if dims != 2 else dict(stride=1, padding=2, dilation=2)
    model = nn.Sequential(conv(2, 6, 3, padding=1), nn.Tanh(), conv(6, 3 * groups, 3, groups=groups, **options))
    model = model.eval()
    size = {1: 9, 2: 7, 3: 5}[dims]
    xs = [torch.randn(n, 2, *[size] * dims) for n in (2, 1)]
    analysed = exported(model, xs[0]) if capture == "exported" else model
    dg = fxprune.analyze(analysed, (xs[0],))
    consumer = calibrated_consumers(dg)["2.weight"]
    assert (consumer.blocks, consumer.in_axis) == (groups, 1)
    stats = collect_statistics(dg, xs, gram=True)["2.weight"]
    with torch.no_grad():
        p = torch.cat([_brute_patches(model[1](model[0](x)).double(), (3,) * dims, **options) for x in xs])
    assert stats.count == len(p)
    torch.testing.assert_close(stats.var, p.var(0, unbiased=False))
    for b, block in enumerate(p.chunk(groups, 1)):
        b1 = torch.cat([block, torch.ones(len(block), 1, dtype=block.dtype)], 1)
        torch.testing.assert_close(stats.block_gram(b), b1.T @ b1 / len(p))


@pytest.mark.parametrize("layer, size", [
    (lambda: nn.Conv1d(6, 4, 4, padding="same"), (9,)),  # even kernel: PyTorch pads the odd extra on the right
    (lambda: nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding=1), (9,)),
    (lambda: nn.Conv2d(6, 4, (2, 3), padding="same", dilation=(1, 2)), (6, 7)),
    (lambda: nn.Conv2d(6, 4, 3, groups=2, stride=2, padding=1), (7, 7)),
    (lambda: nn.Conv3d(6, 3, (2, 3, 1), padding="same", groups=3), (4, 5, 3)),
    (lambda: nn.Conv3d(6, 4, 2, stride=(1, 2, 2), bias=False), (3, 5, 5)),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_consumer_features_times_its_matrices_is_the_layer(layer, size):
    """A consumer is the Linear ``M_b`` over its features, block by block: that reproduces the layer's output."""
    torch.manual_seed(0)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][len(size) - 1]
    model = nn.Sequential(conv(2, 6, 1), nn.Tanh(), layer()).eval()
    x = torch.randn(2, 2, *size)
    consumer = calibrated_consumers(fxprune.analyze(model, (x,)))["2.weight"]
    with torch.no_grad():
        h, expected = model[1](model[0](x)), model(x)
        features = consumer.features(h)
        got = torch.cat([block @ m.T for block, m in zip(features.chunk(consumer.blocks, 1),
                                                        consumer.matrices(model[2].weight))], 1)
        if model[2].bias is not None:
            got = got + model[2].bias
    assert_close_to_scale(got, expected.movedim(1, -1).reshape(-1, expected.shape[1]))


def test_depthwise_convolutions_are_not_calibrated():
    """A depthwise convolution's input unit is its output unit: nothing to refit, no consumer."""
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                          nn.ConvTranspose2d(4, 3, 2)).eval()
    dg = fxprune.analyze(model, (torch.randn(1, 2, 6, 6),))
    assert calibrated_consumers(dg) == {}


def test_statistics_stream_token_axes_and_keep_buffers():
    """(B, T, d) inputs count B * T tokens; a model in training mode keeps its running statistics."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    dg = fxprune.analyze(model, (torch.randn(5, 4),))
    before = model[1].running_mean.clone()
    stats = collect_statistics(dg, [torch.randn(5, 4) for _ in range(3)])
    assert stats["3.weight"].count == 15 and stats["3.weight"].gram_sum is None
    assert torch.equal(model[1].running_mean, before)
    block = Block().eval()
    dg = fxprune.analyze(block, (torch.randn(2, 3, 6),))
    assert collect_statistics(dg, [torch.randn(2, 3, 6)])["fc2.weight"].count == 6


def _redundancy(draw, hidden, constants=True):
    """Planted units (each copying a unit that stays, or constant) for a hidden width."""
    count = draw(st.integers(1, max(1, hidden // 2)))
    order = draw(st.permutations(range(hidden)))
    planted, sources = order[:count], order[count:]
    return {k: draw(st.sampled_from([None, *sources] if constants else sources)) for k in planted}


@st.composite
def redundant_models(draw):
    kind = draw(st.sampled_from(["mlp", "mlp-nobias", "block", "cnn", "cnn1d", "grouped", "addmm"]))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    hidden = draw(st.integers(4, 12))
    units = hidden  # the consumer's input units: channel ranks per block for a grouped convolution
    if kind == "block":
        model = Block(d=draw(st.integers(3, 6)), hidden=hidden)  # d=2: LayerNorm leaves 2 points
    elif kind in ("cnn", "cnn1d"):
        model = CNN(draw(st.integers(1, 3)), hidden, draw(st.integers(1, 3)), dilation=draw(st.integers(1, 2)),
                    dims=1 if kind == "cnn1d" else 2)
    elif kind == "grouped":
        groups, units = draw(st.sampled_from([(2, 2), (2, 3), (3, 2), (2, 4)]))
        model = CNN(draw(st.integers(1, 3)), groups * units, groups * draw(st.integers(1, 2)), groups=groups)
    elif kind == "addmm":
        model = AddmmMLP(draw(st.integers(2, 6)), hidden, draw(st.integers(1, 4)))
    else:
        model = MLP(draw(st.integers(2, 6)), hidden, draw(st.integers(1, 4)), act=nn.GELU, bias=kind == "mlp")
    planted = _redundancy(draw, units, constants=kind != "mlp-nobias")  # no bias: a constant cannot move
    plant_redundant_units(model, planted)
    return model.eval(), planted


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(redundant_models())
def test_reconstruction_removes_planted_redundant_units_exactly(case):
    """Pruning units whose activations are copies of kept units (or constants), reconstruction moves their
    consumer columns onto the copies (or the bias): the outputs do not change."""
    model, planted = case
    x = torch.randn(2, *model.sample)
    dg = fxprune.analyze(model, (x,))
    group = dg.group_of(f"{model.consumer}.weight", getattr(model, "consumer_axis", 1))  # its input units
    removal = {group: sorted(planted)}
    batches = [torch.randn(16, *model.sample) for _ in range(4)]
    test = torch.randn(8, *model.sample)
    consumer = getattr(model, model.consumer)
    with torch.no_grad():
        expected = model(test)
        pruned = fxprune.apply(dg, removal)
        refit = reconstruct(dg, removal, pruned, batches, damping=1e-9)
        assert f"{model.consumer}.weight" in refit
        assert (f"{model.consumer}.bias" in refit) == (consumer.bias is not None)
        assert (getattr(pruned.get_submodule(model.consumer), "bias", None) is None) == (consumer.bias is None)
        assert_close_to_scale(pruned(test), expected, atol=1e-4)


def test_reconstruction_with_default_damping_through_prune():
    """``prune(..., reconstruct=True)`` with a criterion that picks the planted units, default damping."""
    torch.manual_seed(1)
    model = MLP(4, 8, 3, act=nn.GELU).eval()
    plant_redundant_units(model, {2: 5, 6: None})
    planted = lambda group, weights: torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1])  # noqa: E731
    batches = [torch.randn(32, 4) for _ in range(4)]
    test = torch.randn(64, 4)
    pruned = fxprune.prune(model, 0.25, example_inputs=(test[:2],), importance=planted, round_to=1,
                           calibration=batches, reconstruct=True)
    assert pruned.get_submodule("fc1").out_features == 6
    with torch.no_grad():
        assert_close_to_scale(pruned(test), model(test), atol=1e-3)


def _grouped_cnn():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(), nn.Conv2d(8, 6, 3, groups=2),
                         nn.Tanh(), nn.Conv2d(6, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def _conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv1d(6, 4, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4, 3))


@pytest.mark.parametrize("criterion", ["activation", "wanda", "obs"])
@pytest.mark.parametrize("make, shape", [(lambda: MLP(5, 9, 3, act=nn.Tanh), (5,)), (Block, (3, 6)),
                                         (tanh_cnn, (2, 6, 6)), (_grouped_cnn, (2, 6, 6)), (_conv1d_net, (2, 6)),
                                         (lambda: AddmmMLP(4, 9, 3), (4,))])
def test_dead_unit_oracle(criterion, make, shape):
    """Dead units (every slice zero) score lowest (0); removing the lowest-scoring units keeps the outputs."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(4, *shape)
    dg = fxprune.analyze(model, (x,))
    planted = plant_dead_units(dg, seed=3)
    scores = score_groups(resolve_importance(criterion, [torch.randn(8, *shape) for _ in range(2)]), dg, planted)
    lowest = {g: np.sort(np.argsort(scores[g], kind="stable")[:len(units)]) for g, units in planted.items()}
    for g, units in planted.items():
        np.testing.assert_array_equal(lowest[g], units)
    with torch.no_grad():
        expected = model(x)
        assert_close_to_scale(fxprune.apply(dg, lowest)(x), expected)


def test_activation_ranks_a_constant_unit_lowest():
    """Hidden unit 2 never varies (zero row, a bias) but has the largest consumer column: activation ranks it
    lowest, L2 magnitude does not."""
    torch.manual_seed(0)
    model = MLP(3, 4, 2).eval()
    with torch.no_grad():
        model.fc1.weight[2] = 0
        model.fc1.bias[2] = 1.0
        model.fc2.weight[:, 2] = 10.0
    batches = [torch.randn(16, 3) for _ in range(2)]
    dg = fxprune.analyze(model, (batches[0],))
    (group,) = dg.prunable_groups
    activation = score_groups(resolve_importance("activation", batches), dg, [group])[group]
    assert np.argmin(activation) == 2 and activation[2] == 0
    assert np.argmin(score_groups(resolve_importance("l2"), dg, [group])[group]) != 2


def test_activation_score_by_hand_and_magnitude_fallback():
    """Var(x_j) * ||W[:, j]||^2 per hidden unit, divided by the mean; a group consumed only by layers without
    statistics (depthwise and transposed convolutions) falls back to L2."""
    torch.manual_seed(0)
    model = MLP(3, 4, 2).eval()
    batches = [torch.randn(8, 3) for _ in range(3)]
    dg = fxprune.analyze(model, (batches[0],))
    (group,) = dg.prunable_groups
    with torch.no_grad():
        h = torch.cat([_hidden(model, x) for x in batches]).double()
    w = model.fc2.weight.detach().double()
    expected = (h.var(0, unbiased=False) * w.square().sum(0)).numpy()
    got = score_groups(resolve_importance("activation", batches), dg, [group])[group]
    np.testing.assert_allclose(got, expected / expected.mean(), rtol=1e-6)
    wanda = (h.square().mean(0).sqrt() * w.abs().sum(0)).numpy()
    np.testing.assert_allclose(score_groups(resolve_importance("wanda", batches), dg, [group])[group],
                               wanda / wanda.mean(), rtol=1e-6)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(),
                        nn.ConvTranspose2d(4, 3, 2)).eval()  # depthwise, transposed: not calibrated
    dg = fxprune.analyze(cnn, (torch.randn(1, 2, 6, 6),))
    (group,) = dg.prunable_groups
    l2 = score_groups(resolve_importance("l2"), dg, [group])[group]
    got = score_groups(resolve_importance("activation", [torch.randn(2, 2, 6, 6)]), dg, [group])[group]
    np.testing.assert_allclose(got, l2 / l2.mean(), rtol=1e-6)


def _digits_mlp():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        i = torch.randint(0, 1400, (128,))
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_reconstruction_lowers_the_output_error_on_digits(importance):
    model, x, y = _digits_mlp()
    calibration = [x[i:i + 100] for i in range(0, 1000, 100)]
    held_out = x[1400:]
    with torch.no_grad():
        expected = model(held_out)
        errors = {}
        for rec in (False, True):
            pruned = fxprune.prune(model, 0.5, example_inputs=(x[:2],), importance=importance, round_to=1,
                                   calibration=calibration, reconstruct=rec)
            errors[rec] = ((pruned(held_out) - expected).square().mean() / expected.square().mean()).item()
    assert errors[True] < errors[False]


def test_reconstruct_and_activation_need_calibration():
    with pytest.raises(ValueError, match="calibration"):
        fxprune.prune(MLP(), 0.5, example_inputs=(torch.randn(2, 3),), reconstruct=True)
    with pytest.raises(ValueError, match="calibration"):
        fxprune.prune(MLP(), 0.5, example_inputs=(torch.randn(2, 3),), importance="activation")


def _tiny_hf(name, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if name == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, **sizes)
        return transformers.LlamaForCausalLM(config).eval()
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    return transformers.BertModel(transformers.BertConfig(**sizes)).eval()


def _text_batch(seed, batch=4, length=12):
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hf_output(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# relative output error with reconstruct / without, measured over seeds 0-3 (llama 0.84-0.92, bert 0.06-0.11)
HF_ERROR_RATIO = {"llama": 0.95, "bert": 0.5}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_reconstruct_in_place_on_a_hugging_face_model(name, tmp_path):
    """Pruned in place with the refit loaded by parameter name: the model runs (generates), saves and reloads
    with the same outputs, keeps bias-free projections bias-free, and is closer to the original than without
    reconstruction."""
    model = _tiny_hf(name)
    calibration, test = [_text_batch(i) for i in range(4)], _text_batch(99)
    with torch.no_grad():
        expected = _hf_output(model, test)
    errors = {}
    for rec in (False, True):
        pruned = copy.deepcopy(model)
        result = fxprune.prune(pruned, 0.4, example_inputs=_text_batch(50), importance="activation",
                               calibration=calibration, reconstruct=rec, inplace=True, round_to=1)
        assert result is pruned
        with torch.no_grad():
            got = _hf_output(pruned, test)
        errors[rec] = ((got - expected).square().mean() / expected.square().mean()).item()
    assert errors[True] < HF_ERROR_RATIO[name] * errors[False]
    if name == "llama":
        mlp = pruned.model.layers[0].mlp
        assert mlp.down_proj.bias is None and mlp.down_proj.in_features < 64
        pruned.generate(test["input_ids"][:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    pruned.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert_same_outputs(_hf_output(reloaded, test), got)


def test_in_place_calibration_batches_of_other_sizes():
    """With calibration, a Hugging Face model pruned in place is captured with dynamic sizes: batches of other
    batch sizes and lengths than the example run. A graph analysed for in-place pruning without calibration has
    static sizes, and a batch of other sizes fails with both shapes named."""
    model = _tiny_hf("llama")
    fxprune.prune(model, 0.4, example_inputs=_text_batch(50), calibration=[_text_batch(1, 3, 9), _text_batch(2, 4, 7)],
                  reconstruct=True, inplace=True)
    with torch.no_grad():
        assert _hf_output(model, _text_batch(3, 2, 5)).shape[:2] == (2, 5)
    dg = fxprune.analyze(_tiny_hf("llama"), _text_batch(50), inplace=True)
    with pytest.raises(ValueError, match="shape \\(3, 9\\) where the example had \\(4, 12\\)"):
        collect_statistics(dg, [_text_batch(1, 3, 9)])


def test_gpt2_conv1d_consumers_have_activation_statistics():
    """GPT-2's Conv1D (addmm with an (in, out) weight) is calibrated: its MLP group is scored from statistics
    (c_proj's), not by the magnitude fallback, and the refit lowers the output error."""
    model = _tiny_hf("gpt2")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    calibration = [torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    dg = fxprune.analyze(model, (ids,))
    criterion = resolve_importance("activation", calibration)
    group = dg.group_of("transformer.h.0.mlp.c_fc.weight", 1)
    scores = score_groups(criterion, dg, [group])[group]
    assert "transformer.h.0.mlp.c_proj.weight" in criterion.stats
    assert calibrated_consumers(dg)["transformer.h.0.mlp.c_proj.weight"].in_axis == 0
    l2 = score_groups(resolve_importance("l2"), dg, [group])[group]
    assert not np.allclose(scores, l2 / l2.mean(), rtol=1e-2)
    test = torch.randint(0, 100, (8, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, errors = model(test).logits, []
        for rec in (False, True):
            pruned = fxprune.prune(model, 0.4, example_inputs=(ids,), importance="activation", round_to=1,
                                   calibration=calibration, reconstruct=rec)
            out = pruned(test)
            logits = out.logits if hasattr(out, "logits") else out[0]
            errors.append((logits - expected).square().mean().item())
    assert errors[1] < errors[0]


def test_falcon_transposed_weight_consumers_are_calibrated():
    """Falcon projects as ``input @ self.weight.T`` (aten.numpy_T then matmul in the exported graph): the weight's
    input axis is its axis 1, as for a Linear."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_kv_heads=2, new_decoder_architecture=False)
    dg = fxprune.analyze(transformers.FalconForCausalLM(config).eval(), (torch.randint(0, 100, (2, 8)),))
    consumers = calibrated_consumers(dg)
    assert consumers["transformer.h.0.mlp.dense_4h_to_h.weight"].in_axis == 1
    assert consumers["transformer.h.0.mlp.dense_h_to_4h.weight"].in_axis == 1


def test_consumer_without_bias_refits_kept_columns_only():
    """No bias to take a constant unit's mean: the kept columns are the least-squares fit on the calibration
    inputs (error there no larger than plain pruning's), and no bias appears."""
    torch.manual_seed(0)
    model = MLP(3, 6, 2, act=nn.GELU, bias=False).eval()
    plant_redundant_units(model, {1: None, 4: None})
    calibration = torch.randn(64, 3)
    dg = fxprune.analyze(model, (calibration[:2],))
    removal = {dg.group_of("fc1.weight", 0): [1, 4]}
    with torch.no_grad():
        expected, plain = model(calibration), fxprune.apply(dg, removal)
        pruned = fxprune.apply(dg, removal)
        assert reconstruct(dg, removal, pruned, [calibration]) == ["fc2.weight"]
        assert pruned.get_submodule("fc2").bias is None
        assert (pruned(calibration) - expected).square().mean() < (plain(calibration) - expected).square().mean()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_reconstruct_in_place_and_on_device(device):
    """In place (the refit is solved before rewriting edits the weights) equals a copy; CUDA batches work."""
    torch.manual_seed(0)
    model = MLP(4, 16, 3).eval().to(device)
    batches = [torch.randn(32, 4, device=device) for _ in range(3)]
    x = torch.randn(8, 4, device=device)
    options = dict(example_inputs=(x[:2],), importance="activation", calibration=batches, reconstruct=True,
                   round_to=1)
    pruned = fxprune.prune(model, 0.5, **options)
    assert fxprune.plan_of(pruned).settings["reconstruct"] is True
    with torch.no_grad():
        expected = pruned(x)
        in_place = fxprune.prune(copy.deepcopy(model), 0.5, inplace=True, **options)
        torch.testing.assert_close(in_place(x), expected)


def test_batches_must_be_model_inputs():
    model = MLP().eval()
    dg = fxprune.analyze(model, (torch.randn(2, 3),))
    with pytest.raises(ValueError, match="not \\(inputs, targets\\)"):
        collect_statistics(dg, [(torch.randn(2, 3), torch.tensor([0, 1]))])


def test_reconstruct_on_an_exported_hugging_face_model():
    """LLaMA through torch.export (aten.linear consumers), dict batches: the refit lowers the logits' error."""
    pytest.importorskip("transformers")
    model = fxprune.testing.tiny_llama()
    ids = torch.randint(0, 100, (4, 12))
    batches = [{"input_ids": torch.randint(0, 100, (4, 12))} for _ in range(3)]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        errors = []
        for rec in (False, True):
            pruned = fxprune.prune(model, 0.3, example_inputs={"input_ids": ids[:2]}, importance="wanda",
                                   calibration=batches, reconstruct=rec)
            out = pruned(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            errors.append((logits - expected).square().mean().item())
    assert errors[1] < errors[0]


def test_one_pass_over_a_generator_feeds_criterion_and_refit():
    torch.manual_seed(0)
    model = MLP(4, 8, 3).eval()
    batches = [torch.randn(16, 4) for _ in range(3)]
    options = dict(example_inputs=(batches[0][:2],), importance="wanda", reconstruct=True, round_to=1)
    from_list = fxprune.prune(model, 0.5, calibration=batches, **options)
    from_generator = fxprune.prune(model, 0.5, calibration=(b for b in batches), **options)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(from_generator(x), from_list(x))


def _refit_error(weight, bias, gram, removed, damping):
    """Brute force: ``E||Wt x~ - Wt' x~_S||^2`` after :func:`refit` of the columns not in ``removed``."""
    d = weight.shape[1]
    kept = torch.tensor([j for j in range(d) if j not in set(removed)])
    w_kept, b_kept = refit(weight, bias, gram, kept, damping)
    wt = torch.cat([weight, bias[:, None]], 1) if bias is not None else weight.clone()
    fitted = torch.zeros_like(wt)
    fitted[:, kept] = w_kept
    if bias is not None:
        fitted[:, d] = b_kept
    g = gram if bias is not None else gram[:d, :d]
    diff = wt - fitted
    return torch.trace(diff @ g @ diff.T).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("width", [1, 3])
def test_obs_is_the_refit_error_by_hand(bias, width):
    """dE(U) = trace(Wt[:, U] Hinv[U, U]^-1 Wt[:, U]^T) is the error the refit leaves without the columns U
    (units of one column and of three), with and without a bias."""
    torch.manual_seed(0)
    d, damping = 6, 1e-12
    x = torch.cat([torch.randn(40, d, dtype=torch.float64) + torch.randn(d), torch.ones(40, 1)], 1)
    gram = x.T @ x / len(x)
    weight, b = torch.randn(4, d, dtype=torch.float64), torch.randn(4, dtype=torch.float64) if bias else None
    columns = np.arange(d).reshape(-1, width)
    hinv = damped_inverse(gram if bias else gram[:d, :d], damping)
    expected = [_refit_error(weight, b, gram, cols, damping) for cols in columns]
    np.testing.assert_allclose(obs_scores(weight, b, hinv, columns), expected, rtol=1e-6)


def test_obs_scores_equal_the_refit_error_through_the_graph():
    """Through prune's scoring: conv channels (9 columns each of the next conv), conv channels flattened into
    a Linear (16 columns each) and Linear units (1 column): each score is its consumer's refit error."""
    torch.manual_seed(0)
    model, damping = tanh_cnn().eval(), 1e-12
    batches = [torch.randn(32, 2, 6, 6) for _ in range(4)]
    dg = fxprune.analyze(model, (batches[0][:2],))
    stats = collect_statistics(dg, batches, gram=True)
    scores = score_groups(OBS(batches, damping=damping, normalizer=None), dg, dg.prunable_groups)
    checked = set()
    for name, consumer in calibrated_consumers(dg).items():
        (group,) = consumer.groups
        weight = dg.gm.get_parameter(name).detach().double()
        flat, bias = weight.reshape(len(weight), -1), dg.gm.get_parameter(consumer.bias).detach().double()
        width = flat.shape[1] // group.units  # channel-major: unit u owns columns u * width ... (u + 1) * width - 1
        expected = [_refit_error(flat, bias, stats[name].gram, range(u * width, (u + 1) * width), damping)
                    for u in range(group.units)]
        np.testing.assert_allclose(scores[group], expected, rtol=1e-6)
        checked.add(width)
    assert checked == {9, 16, 1}


def test_obs_scores_a_copied_unit_near_zero():
    """Hidden unit 2 copies unit 5: the refit moves its column onto unit 5's, so obs scores both (near) zero and
    lowest; activation, which looks at one column at a time, does not."""
    torch.manual_seed(0)
    model = MLP(4, 8, 3, act=nn.GELU).eval()
    plant_redundant_units(model, {2: 5})
    batches = [torch.randn(32, 4) for _ in range(4)]
    dg = fxprune.analyze(model, (batches[0][:2],))
    (group,) = dg.prunable_groups
    obs = score_groups(resolve_importance("obs", batches), dg, [group])[group]
    activation = score_groups(resolve_importance("activation", batches), dg, [group])[group]
    assert set(np.argsort(obs)[:2]) == {2, 5} and obs[2] < 1e-2  # mean-normalised: others are ~1
    assert activation[2] > 0.1 and set(np.argsort(activation)[:2]) != {2, 5}


class _CountingBatches:
    """A re-iterable list of batches that counts the batches taken from it (tqdm calls ``iter`` more than once
    per pass, so passes are counted in batches)."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


@pytest.mark.parametrize("reconstruct", [False, True])
def test_obs_and_reconstruction_share_one_pass(reconstruct):
    torch.manual_seed(0)
    model = MLP(4, 8, 3).eval()
    batches = _CountingBatches([torch.randn(16, 4) for _ in range(3)])
    pruned = fxprune.prune(model, 0.5, example_inputs=(batches.batches[0][:2],), importance="obs", round_to=1,
                           calibration=batches, reconstruct=reconstruct)
    assert batches.taken == len(batches)  # one pass
    assert pruned.get_submodule("fc1").out_features == 4


# -- validated refits (fxprune.calibration.ridge) and padding ---------------------------------------------------

def _low_rank_inputs(n: int, basis: torch.Tensor, generator) -> torch.Tensor:
    """Inputs near a few directions (``basis``), so that hidden units are correlated: a refit has something to
    move onto kept units, and with few tokens also noise to fit."""
    z = torch.randn(n, basis.shape[0], generator=generator)
    return z @ basis + 0.3 * torch.randn(n, basis.shape[1], generator=generator)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validated_refit_beats_no_refit_and_fixed_damping_on_fresh_inputs_when_tokens_are_few(seed):
    """60 calibration tokens for a consumer that keeps 64 inputs: the least-squares refit at today's fixed damping
    fits the calibration tokens' noise; the strength validated on their held-out fifth shrinks it, and on fresh
    inputs its output error is below both the unrefit model's and the fixed damping's. The too-few-tokens warning
    says so with the counts, and meta records the choice."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    basis = torch.randn(6, 16, generator=g)
    model = nn.Sequential(nn.Linear(16, 96), nn.Tanh(), nn.Linear(96, 8)).eval()
    batches = [_low_rank_inputs(12, basis, g) for _ in range(5)]
    fresh = _low_rank_inputs(2000, basis, g)
    dg = fxprune.analyze(model, (batches[0],))
    removal = {dg.group_of("2.weight", 1): list(range(0, 96, 3))}  # 32 of 96 hidden units
    with torch.no_grad():
        expected = model(fresh)

    def error(pruned) -> float:
        with torch.no_grad():
            return ((pruned(fresh) - expected) ** 2).mean().item() / expected.var().item()

    fixed = fxprune.apply(dg, removal)
    reconstruct(dg, removal, fixed, batches, damping=1e-4)
    report = {}
    validated = fxprune.apply(dg, removal)
    with pytest.warns(UserWarning, match=r"2\.weight: 60 tokens for 64 kept inputs"):
        reconstruct(dg, removal, validated, batches, report=report)
    unrefit = error(fxprune.apply(dg, removal))
    assert error(validated) < 0.8 * min(unrefit, error(fixed)), (error(validated), unrefit, error(fixed))
    choice = report["2.weight"]
    assert choice["tokens"] == 60 and choice["held_out_tokens"] == 10 and choice["width"] == 64
    assert float(choice["strength"]) > 1e-4  # shrunk more than the fixed damping
    assert choice["held_out_error_after"] < choice["held_out_error_before"]
    pruned = fxprune.prune(model, 1 / 3, example_inputs=(batches[0],), importance="l2", round_to=1,
                           calibration=batches, reconstruct=True)
    assert set(pruned.meta["fxprune_refit"]["one-shot"]) == {"2.weight"}


def test_validated_refit_is_the_least_squares_one_when_tokens_are_plenty():
    """Planted copies with plenty of tokens: the held-out tokens ask for (almost) no shrinkage, and the outputs do
    not change (the redundant-unit oracle at the default, validated strength)."""
    torch.manual_seed(0)
    model = MLP(4, 8, 3, act=nn.GELU).eval()
    plant_redundant_units(model, {2: 5, 6: None})
    batches = [torch.randn(64, 4) for _ in range(8)]
    test = torch.randn(64, 4)
    dg = fxprune.analyze(model, (test[:2],))
    removal = {dg.group_of("fc2.weight", 1): [2, 6]}
    pruned, report = fxprune.apply(dg, removal), {}
    reconstruct(dg, removal, pruned, batches, report=report)
    with torch.no_grad():
        assert_close_to_scale(pruned(test), model(test), atol=1e-3)
    assert report["fc2.weight"]["held_out_error_after"] < 1e-4


class Tokens(nn.Module):
    """Token ids -> embedding -> Linear -> ReLU -> Linear; the mask is an input the layers do not read."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(20, 6), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def test_padding_positions_do_not_count_in_the_statistics():
    """A tokenizer-style dict batch: the rows at attention_mask == 0 are left out of every sum (whatever their
    ids), so the statistics equal those of the unpadded tokens alone, counted by brute force."""
    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(1, 20, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.int64)
    mask[1, 3:], mask[4, 1:] = 0, 0
    batch = {"input_ids": ids, "attention_mask": mask}
    dg = fxprune.analyze(model, (), kwargs=batch)
    stats = collect_statistics(dg, [batch], gram=True)["fc2.weight"]
    other = dict(batch, input_ids=torch.where(mask.bool(), ids, torch.randint(1, 20, ids.shape)))
    again = collect_statistics(fxprune.analyze(model, (), kwargs=batch), [other], gram=True)["fc2.weight"]
    with torch.no_grad():
        x = torch.relu(model.fc1(model.embed(ids)))[mask.bool()].double()  # (tokens, 8): the unpadded rows
    assert stats.count == again.count == int(mask.sum()) == 24
    torch.testing.assert_close(stats.total, x.sum(0))
    torch.testing.assert_close(stats.gram_sum[:8, :8], x.T @ x)
    torch.testing.assert_close(again.gram_sum, stats.gram_sum)
    assert stats.held == 1  # sequence 4 (of 6), one token unpadded


# -- "obs-output": OBS in units of the model's output ------------------------------------------------------------

class Scaled(nn.Module):
    """fc1 -> tanh -> fc2, the output times ``scale`` (a downstream factor the consumer's own output does not see)."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(4, 12), nn.Linear(12, 3), scale

    def forward(self, x):
        return self.scale * self.fc2(torch.tanh(self.fc1(x)))


def test_output_sensitivity_scales_with_what_follows_the_consumer():
    """F = E[g g^T], g the gradient of r . output at the consumer's output: a factor 3 after the consumer makes F
    nine times larger (same random directions), and F is symmetric positive semi-definite."""
    from fxprune.calibration import output_sensitivity

    torch.manual_seed(0)
    one, three = Scaled(1.0).eval(), Scaled(3.0).eval()
    three.load_state_dict(one.state_dict())
    batches = [torch.randn(16, 4) for _ in range(3)]
    f1 = output_sensitivity(fxprune.analyze(one, (batches[0],)), batches)["fc2.weight"]
    f3 = output_sensitivity(fxprune.analyze(three, (batches[0],)), batches)["fc2.weight"]
    torch.testing.assert_close(f3, 9 * f1, rtol=1e-5, atol=1e-9 * float(f3.abs().max()))
    assert f1.shape == (3, 3) and torch.linalg.eigvalsh(f1).min() > -1e-9


class Damped(nn.Module):
    """Two MLP blocks of one structure side by side, the first one's output scaled down by 0.01 before the sum: the
    model's output hardly moves with it, whatever its consumer's (a2's) own output error."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.b1, self.b2 = nn.Linear(6, 24), nn.Linear(24, 6), nn.Linear(6, 24), nn.Linear(24, 6)

    def forward(self, x):
        return self.b2(torch.tanh(self.b1(x))) + 0.01 * self.a2(torch.tanh(self.a1(x)))


def test_obs_output_takes_units_where_the_output_moves_least():
    """Globally within the isomorphic class of the two MLP blocks, "obs-output" takes most units from the block
    scaled down, and its pruned model is closer to the original than "obs"'s at the same budget
    ("obs" ranks each block's scores divided by their mean: about half from each)."""
    torch.manual_seed(0)
    model = Damped().eval()
    batches = [torch.randn(32, 6) for _ in range(6)]
    test = torch.randn(256, 6)
    kept, error = {}, {}
    for importance in ("obs", "obs-output"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(batches[0],), importance=importance, calibration=batches,
                               reconstruct=True, global_pruning=True, isomorphic=True, round_to=1)
        kept[importance] = (pruned.get_submodule("a1").out_features, pruned.get_submodule("b1").out_features)
        with torch.no_grad():
            error[importance] = ((pruned(test) - model(test)) ** 2).mean().item()
    assert sum(kept["obs-output"]) == sum(kept["obs"]) == 24
    assert kept["obs-output"][0] < 8 < kept["obs-output"][1], kept
    assert error["obs-output"] < 0.5 * error["obs"], error


def test_pruner_ranks_obs_output_scores_as_prune_does():
    """"obs-output"'s scores are on one scale across groups (``plan_normalizer = None``): a one-step ``Pruner``
    removes the units ``prune`` removes, most of them from the damped block (dividing each group's scores by
    their mean, as the Pruner once did, takes about half from each block)."""
    torch.manual_seed(0)
    model = Damped().eval()
    batches = [torch.randn(32, 6) for _ in range(6)]
    options = dict(importance="obs-output", calibration=batches, reconstruct=True, global_pruning=True,
                   isomorphic=True, round_to=1)
    once = fxprune.prune(model, 0.5, example_inputs=(batches[0],), **options)
    stepped = fxprune.Pruner(model, (batches[0],), ratio=0.5, steps=1, **options).step()
    assert fxprune.plan_of(stepped).groups == fxprune.plan_of(once).groups
    assert stepped.get_submodule("a1").out_features < 8 < stepped.get_submodule("b1").out_features


def test_greedy_scores_by_hand():
    """Uncorrelated inputs: units go cheapest first; correlated copies: once one copy is gone the other costs its
    full norm (a one-shot score would call both free)."""
    from fxprune.calibration.obs import greedy_scores

    eye = torch.eye(3, dtype=torch.float64)
    np.testing.assert_allclose(greedy_scores(torch.tensor([[1.0, 3.0, 2.0]]), eye, np.array([[0], [1], [2]])),
                               [1.0, 40.0, 4.0])
    gram = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    hinv = damped_inverse(gram, 1e-6)
    scores = greedy_scores(torch.tensor([[1.0, 1.0, 5.0]]), hinv, np.array([[0], [1], [2]]))
    assert min(scores[:2]) < 1e-4 and max(scores[:2]) == pytest.approx(4.0, rel=1e-3)  # the copy, then 2^2


def test_output_check_keeps_a_refit_that_helps_the_output_and_undoes_one_that_hurts():
    """The one-shot refit is checked at the model's output on the held-out sequences (every fifth of a batch of at
    least five): the validated refit of planted copies lowers it and is kept; a refit that moves the output
    further (a garbage weight) is undone, the pruned weight restored as it was; prune's meta says what ran."""
    from fxprune.calibration.output_check import check_refits, original_outputs, output_error
    from fxprune.calibration.statistics import held_out_batches
    from fxprune.calibration.reconstruct import refit_consumers

    torch.manual_seed(0)
    model = MLP(4, 8, 3, act=nn.GELU).eval()
    plant_redundant_units(model, {2: 5, 6: None})
    batches = [torch.randn(10, 4) for _ in range(4)] + [torch.randn(3, 4)]  # the last one too small to hold out
    held = held_out_batches(batches)
    assert [len(b) for b in held] == [2, 2, 2, 2] and torch.equal(held[0], batches[0][[4, 9]])
    assert [sorted(b) for b in held_out_batches([{"x": torch.randn(5, 4), "n": 1}])] == [["n", "x"]]
    dg = fxprune.analyze(model, (batches[0][:2],))
    removal = {dg.group_of("fc2.weight", 1): [2, 6]}
    targets = original_outputs(dg.gm, held)
    good = refit_consumers(dg, removal, batches)
    for refit, kept in ((good, True), ({"fc2.weight": 50 * torch.randn(3, 6)}, False)):
        pruned, report = fxprune.apply(dg, removal), {"fc2.weight": {}}
        before = pruned.fc2.weight.detach().clone()
        unrefit, summary = output_error(pruned, held, targets), {}
        out = check_refits(pruned, refit, [("fc2.weight", list(refit))], held, targets, report, summary)
        assert report["fc2.weight"]["output_check"] == ("kept" if kept else "undone")
        assert report["fc2.weight"]["output_error_before"] == pytest.approx(unrefit)
        # the whole pruning's held-out error, before any refit and after the kept ones
        assert summary["output_error_unrefit"] == pytest.approx(unrefit)
        assert summary["output_error"] == pytest.approx(output_error(pruned, held, targets))
        if kept:
            assert set(out) == set(good) and output_error(pruned, held, targets) < 1e-3 * unrefit
        else:
            assert out == {} and torch.equal(pruned.fc2.weight, before)
    pruned = fxprune.prune(model, 0.25, example_inputs=(batches[0][:2],), importance="l2", round_to=1,
                           calibration=batches, reconstruct=True)
    meta = pruned.meta["fxprune_refit"]
    assert meta["output check"]["held_out_sequences"] == 8 and meta["output check"]["consumers"] == 1
    assert meta["output check"]["output_error"] <= meta["output check"]["output_error_unrefit"]
    assert meta["one-shot"]["fc2.weight"]["output_check"] in ("kept", "undone")
    small = fxprune.prune(model, 0.25, example_inputs=(batches[0][:2],), importance="l2", round_to=1,
                          calibration=[torch.randn(4, 4)] * 3, reconstruct=True)
    assert small.meta["fxprune_refit"]["output check"].startswith("not run: no calibration batch holds 5")
