"""Property tests: random architectures (tests/property/archs.py), any ratio, the dead-unit oracle.

For every generated model and every ratio in [0, 0.9]:

1. ``fxprune.prune`` returns a GraphModule that runs on real inputs (the example and a fresh one);
2. its output shapes equal the original's;
3. its parameter count does not grow (and shrinks when the plan removes any unit);
4. the original model is not modified (parameter/buffer shapes and values, and its output);
5. the dead-unit oracle: plant dead units in the prunable groups without a normalisation over their
   axis, prune exactly those units with ``fxprune.apply``: the output is unchanged (atol 1e-5
   relative to the output's scale), and every parameter axis lost exactly the planted indices.

``test_prune_options_run_and_keep_shapes`` checks (1) to (4) under other importance criteria,
``round_to`` and global ranking, and pruning the pruned GraphModule a second time.

Every tensor is drawn from a torch seed that is part of the drawn :class:`archs.Arch`, so the
falsifying example hypothesis prints rebuilds the same model: ``archs.build(Arch(...))``.
Run more examples with ``FXPRUNE_PROPERTY_SCALE=10 python -m pytest tests/property``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

import fxprune
from fxprune.planning.alignment import default_alignment, removal_steps
from fxprune.planning.selection import units_to_keep
from fxprune.testing import assert_same_state, oracle_groups, plant_dead_units, state_snapshot
from tests.property import archs
from tests.property.archs import (BN, MHA, MLP, SE, Act, Arch, Attention, ChannelLN, Concat, Conv, GroupNormB,
                                  Head, LayerNormB, Linear, Pool, Residual, Shuffle, Split, ToTokens)

SCALE = float(os.environ.get("FXPRUNE_PROPERTY_SCALE", "1"))
MAX_BLOCKS = int(os.environ.get("FXPRUNE_PROPERTY_BLOCKS", "5"))
# CI budget: at least 200 examples in all (plus the @example cases), under 3 minutes on 2 cores.
PRUNE_EXAMPLES = max(1, int(100 * SCALE))
ORACLE_EXAMPLES = max(1, int(100 * SCALE))
OPTIONS_EXAMPLES = max(1, int(40 * SCALE))

SETTINGS = dict(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ratios = st.floats(min_value=0.0, max_value=0.9, allow_nan=False)
IMPORTANCES = ["l2", "l1", "lamp", "fpgm", "random", "bn_scale"]

# Hand-written cases that every run covers, whatever hypothesis draws (one per hard construct).
HAND_WRITTEN = [
    # the worked example of the design notes: conv -> bn -> relu -> grouped conv + residual -> flatten -> fc
    Arch((3, 8, 8), (Conv(3, 8, 3, 1, True, True, "relu"), Residual((Conv(8, 8, 3, 2, True, False, None),)),
                     Pool("max")), Head("flatten", 8 * 4 * 4), 0),
    # depthwise + channel shuffle (ints, -1, sizes computed from x.size()) + concat with two identity branches
    Arch((3, 8, 8), (Conv(3, 12, 1, 1, False, True, "silu"), Conv(12, 12, 3, 12, False, True, None),
                     Shuffle(12, 3, "const"), Shuffle(12, 4, "minus1"), Shuffle(12, 2, "computed"),
                     Concat(((), (), (Conv(12, 4, 1, 2),))),
                     Conv(28, 8, 1, 1, True, False, "gelu")), Head("pool", 8), 1),
    # split into unequal pieces, chunk + add, gating, SE, group norm, channel LayerNorm
    Arch((3, 8, 8), (Conv(3, 12, 3, 1, True, False, "relu"),
                     Split((5, 7), "split", ((Conv(5, 6, 1),), ()), "cat"),
                     Act("gelu"),
                     Split((7, 6), "torch_split", ((), (Conv(6, 4, 3, 2, True, True, "tanh"),)), "cat"),
                     Split((6, 5), "split", ((Conv(6, 8, 1),), (Conv(5, 8, 1, 1, False),)), "add"),
                     Split((4, 4), "chunk", ((), (Conv(4, 4, 3, 4),)), "gate"), SE(4, 2), GroupNormB(4, 2),
                     ChannelLN(4), BN(4)), Head("mean", 4), 2),
    # image -> tokens -> attention (fused, sdpa, symbolic sizes) -> MLP -> LayerNorm -> flatten head
    Arch((3, 8, 8), (Conv(3, 8, 3, 1, True, True, "relu"), Pool("avg"), ToTokens(),
                     Attention(8, 2, 4, 4, True, "sdpa", True, "symbolic"), LayerNormB(8), MLP(8, 16, "gelu", True),
                     Linear(8, 6, True, "relu")), Head("flatten", 6 * 16), 3),
    # token model: separate q/k/v with a different v head dim, manual softmax attention, constant sizes
    Arch((6, 8), (Attention(8, 4, 2, 4, False, "manual", True, "const"), Linear(8, 12, False, "sigmoid"),
                  Attention(12, 2, 8, 2, False, "sdpa", False, "minus1")), Head("mean", 12), 4),
    # GQA (sdpa enable_gqa; expand + reshape, fused and split), MHA, SwiGLU, strided stem, auxiliary output
    Arch((3, 8, 8), (Conv(3, 8, 3, 1, True, True, "relu", stride=2), ToTokens("reshape"),
                     Attention(8, 4, 4, 2, True, "sdpa", True, "symbolic", kv_heads=2),
                     Attention(8, 4, 2, 4, True, "manual", True, "const", kv_heads=1),
                     Attention(8, 2, 4, 4, False, "sdpa", True, "minus1", kv_heads=1),
                     MHA(8, 2, True, True), MLP(8, 8, "silu", True, glu=True)), Head("mean", 8), 5, aux=True),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads cost more than they save (and oversubscribe a 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outs(out) -> list[torch.Tensor]:
    """A model's output as a list of tensors (the logits, then any auxiliary output)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close(got, expected, rel: float, what: str) -> None:
    """Every output equal up to ``rel`` times its scale (at least 1): float rounding, nothing more."""
    got, expected = _outs(got), _outs(expected)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for i, (g, e) in enumerate(zip(got, expected)):
        scale = e.abs().max().item()
        err = (g - e).abs().max().item()
        assert err <= rel * max(1.0, scale), f"{what}: output {i} differs by {err:.3e} (scale {scale:.3e})"


def _check_nontrivial(out) -> float:
    """The output must carry signal, or comparing outputs would prove nothing.

    A random net can be dead (ReLU after ReLU in 4 channels, a norm before a mean): such a draw is
    discarded (``assume``), not failed; hypothesis reports if that happens too often.
    """
    out = _outs(out)[0]
    assert torch.isfinite(out).all()
    scale = out.abs().max().item()
    assume(scale > 1e-2)  # trivially small output
    assume((out[0] - out[1]).abs().max().item() > 1e-4 * scale)  # output does not depend on the input
    return scale


@settings(max_examples=PRUNE_EXAMPLES, **SETTINGS)
@given(arch=archs.architectures(MAX_BLOCKS), ratio=ratios)
@example(arch=HAND_WRITTEN[0], ratio=0.5)
@example(arch=HAND_WRITTEN[1], ratio=0.9)
@example(arch=HAND_WRITTEN[2], ratio=0.3)
@example(arch=HAND_WRITTEN[3], ratio=0.5)
@example(arch=HAND_WRITTEN[4], ratio=0.75)
@example(arch=HAND_WRITTEN[5], ratio=0.5)
@example(arch=HAND_WRITTEN[0], ratio=0.0)
def test_prune_runs_keeps_shapes_and_leaves_the_original(arch: Arch, ratio: float):
    note(archs.describe(arch))
    model, inputs = archs.build(arch)
    before = state_snapshot(model)
    with torch.no_grad():
        expected = model(*inputs)
    _check_nontrivial(expected)

    dg = fxprune.analyze(model, inputs)
    note(dg.report())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.prune(model, ratio, example_inputs=inputs)

    # (1) a GraphModule that runs on real inputs, the example and a fresh one
    assert isinstance(pruned, fx.GraphModule)
    fresh = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(arch.seed + 1))
    with torch.no_grad():
        got, got_fresh = pruned(*inputs), pruned(fresh)
    # (2) output shapes equal the original's
    assert [o.shape for o in _outs(got)] == [o.shape for o in _outs(expected)]
    assert [o.shape for o in _outs(got_fresh)] == [o.shape for o in _outs(expected)]
    assert all(torch.isfinite(o).all() for o in _outs(got) + _outs(got_fresh))
    # (3) parameter count does not grow, and shrinks when some group loses units
    n_before, n_after = _n_params(model), _n_params(pruned)
    assert n_after <= n_before
    steps = removal_steps(dg, dg.prunable_groups, default_alignment(model))
    loses = [g for g in dg.prunable_groups if units_to_keep(g.units, ratio, steps[g]) < g.units]
    if loses:
        assert n_after < n_before, f"groups {loses} should lose units, but no parameter went away"
    else:  # nothing to remove: the same function
        assert n_after == n_before
        _assert_close(got, expected, 1e-5, "ratio removes no unit, yet the output changed")
    # (4) the original model is not modified
    assert_same_state(model, before, "prune modified the original model")
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), expected, atol=0, rtol=0)


@settings(max_examples=OPTIONS_EXAMPLES, **SETTINGS)
@given(arch=archs.architectures(MAX_BLOCKS), ratio=ratios, importance=st.sampled_from(IMPORTANCES),
       round_to=st.sampled_from([None, 2, 3]), global_pruning=st.booleans(), again=st.booleans())
def test_prune_options_run_and_keep_shapes(arch: Arch, ratio: float, importance: str, round_to, global_pruning,
                                           again: bool):
    """Properties (1) to (4) under other criteria, ``round_to`` and global ranking; and pruning a pruned
    GraphModule again (its rewritten shape constants must analyse like hand-written ones)."""
    note(archs.describe(arch))
    model, inputs = archs.build(arch)
    before = state_snapshot(model)
    with torch.no_grad():
        expected = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.prune(model, ratio, example_inputs=inputs, importance=importance, round_to=round_to,
                               global_pruning=global_pruning)
    assert isinstance(pruned, fx.GraphModule)
    with torch.no_grad():
        got = pruned(*inputs)
    assert [o.shape for o in _outs(got)] == [o.shape for o in _outs(expected)]
    assert all(torch.isfinite(o).all() for o in _outs(got))
    assert _n_params(pruned) <= _n_params(model)
    assert_same_state(model, before, "prune modified the original model")
    if again:
        first = state_snapshot(pruned)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twice = fxprune.prune(pruned, ratio, example_inputs=inputs, importance=importance, round_to=round_to,
                                  global_pruning=global_pruning)
        with torch.no_grad():
            got_twice = twice(*inputs)
        assert [o.shape for o in _outs(got_twice)] == [o.shape for o in _outs(expected)]
        assert _n_params(twice) <= _n_params(pruned)
        assert_same_state(pruned, first, "pruning a GraphModule modified it")


@settings(max_examples=ORACLE_EXAMPLES, **SETTINGS)
@given(arch=archs.architectures(MAX_BLOCKS), fraction=st.floats(0.05, 0.9), seed=st.integers(0, 2**16), data=st.data())
@example(arch=HAND_WRITTEN[0], fraction=0.5, seed=0, data=None)
@example(arch=HAND_WRITTEN[1], fraction=0.9, seed=1, data=None)
@example(arch=HAND_WRITTEN[2], fraction=0.34, seed=2, data=None)
@example(arch=HAND_WRITTEN[3], fraction=0.5, seed=3, data=None)
@example(arch=HAND_WRITTEN[4], fraction=0.5, seed=4, data=None)
@example(arch=HAND_WRITTEN[5], fraction=0.5, seed=5, data=None)
def test_dead_unit_oracle(arch: Arch, fraction: float, seed: int, data):
    note(archs.describe(arch))
    model, inputs = archs.build(arch)
    with torch.no_grad():
        _check_nontrivial(model(*inputs))  # before planting: dead units may (rightly) kill the signal
    dg = fxprune.analyze(model, inputs)
    note(dg.report())
    candidates = oracle_groups(dg)
    if data is not None and candidates:  # sometimes only a subset of the groups loses units
        mask = data.draw(st.lists(st.booleans(), min_size=len(candidates), max_size=len(candidates)), label="groups")
        if any(mask) and not all(mask):
            candidates = [g for g, keep in zip(candidates, mask) if keep]
    removal = plant_dead_units(dg, candidates, fraction=fraction, seed=seed)
    note(f"removal: { {f'G{g.id}({g.units})': list(map(int, u)) for g, u in removal.items()} }")
    with torch.no_grad():
        expected = model(*inputs)  # the planted model, dead units included
        analysed = dg.gm(*inputs)  # the captured graph (nn.MultiheadAttention decomposed): the same function
    assert all(torch.isfinite(o).all() for o in _outs(expected))
    _assert_close(analysed, expected, 1e-5, "the captured graph is not the model")
    planted = state_snapshot(model)

    # which flat indices every parameter and buffer axis must lose: the union over the planted groups
    lost: dict[tuple, set] = {}
    for group, units in removal.items():
        for member in group.members:
            if member.name not in planted:
                continue
            lost.setdefault((member.name, member.dim), set()).update(member.indices(group, units).tolist())

    pruned = fxprune.apply(dg, removal)
    with torch.no_grad():
        got = pruned(*inputs)
    _assert_close(got, expected, 1e-5, "removing dead units changed the output")

    # exactly the planted indices went away, and the planted values are what is left
    tensors = pruned.state_dict()
    for (name, dim), indices in lost.items():
        kept = planted[name].shape[dim] - len(indices)
        assert tensors[name].shape[dim] == kept, f"{name}[{dim}]: expected {kept} indices kept"
    for name, tensor in tensors.items():
        if name not in planted:
            continue
        old = planted[name]
        ref = old
        for dim in range(old.ndim):
            if (name, dim) in lost:
                keep = np.setdiff1d(np.arange(old.shape[dim]), sorted(lost[(name, dim)]))
                ref = ref.index_select(dim, torch.as_tensor(keep, dtype=torch.long))
        assert torch.equal(tensor.detach(), ref), f"{name}: the kept entries are not the original ones"

    if removal:
        assert _n_params(pruned) < _n_params(model)
    else:  # no oracle group (all frozen or normalised): apply of nothing is the identity
        assert _n_params(pruned) == _n_params(model)
    # apply leaves the analysed (planted) model alone
    assert_same_state(model, planted, "apply modified the analysed model")
