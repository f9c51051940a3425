"""``prune(..., allocation="measured")`` (fxprune.planning.measured, issue 20): each isomorphic class's units spread
across its groups by measured held-out output error; its pieces (splice, error curves, swaps) on their own."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import fxprune
from fxprune.calibration.output_check import model_output, original_outputs, output_error
from fxprune.calibration.statistics import HELD_SEQUENCES, held_out_batches
from fxprune.io.plans import find_group, plan_of
from fxprune.planning.error_curves import allocate, monotone_cubic, swaps
from fxprune.planning.measured import REPORT, in_context
from fxprune.planning.splice import splice
from tests import models

MEASURED = dict(importance="l2", reconstruct=True, global_pruning=True, isomorphic=True, round_to=1,
                allocation="measured")


def planted():
    """BlockStack of three same-width blocks whose middle MLP's output is 20x the others' (its units matter far
    more than a weight norm says), random calibration inputs, and the residual stream kept (``ignore``)."""
    torch.manual_seed(0)
    model = models.BlockStack((64, 64, 64)).eval()
    with torch.no_grad():
        model.blocks[1].mlp[2].weight.mul_(20)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 6, 12, generator=gen) for _ in range(6)]
    return model, calibration, dict(example_inputs=(calibration[0][:1],), calibration=calibration,
                                    ignore=[model.embed])


def test_measured_allocation_beats_the_one_step_one_where_a_layer_matters_more():
    model, calibration, inputs = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # kept the measured allocation: no fallback warning
        pruned = fxprune.prune(model, 0.4, **inputs, **MEASURED, allocation_rounds=1)
    report = pruned.meta[REPORT]
    assert report["kept"] == "measured" and report["reason"] is None and report["rounds"] == 1
    assert report["measured_error"] < report["one_step_error"] and report["cpu_seconds"] > 0
    held = held_out_batches(calibration, HELD_SEQUENCES)  # the error reported is the result's own
    assert output_error(pruned, held, original_outputs(model, held)) == pytest.approx(report["measured_error"],
                                                                                      rel=1e-4)
    mlps = next(c for c in report["removed"].values() if all(units == 64 for _, units in c.values()))
    one_step = report["one_step_removed"]
    for cls, counts in report["removed"].items():  # each class loses the one-step count, spread differently
        assert sum(n for n, _ in counts.values()) == sum(n for n, _ in one_step[cls].values())
    middle = find_group(fxprune.analyze(model, inputs["example_inputs"], ignore=inputs["ignore"]),
                        next(e.key for e in plan_of(pruned).groups if "blocks.1.mlp.0.weight[0]" in e.members))
    assert mlps[str(middle.id)][0] < min(n for g, (n, _) in mlps.items() if g != str(middle.id)) < 64
    assert sum(n for n, _ in mlps.values()) == round(0.4 * 3 * 64)
    assert pruned.get_parameter("blocks.1.mlp.0.weight").shape[0] == 64 - mlps[str(middle.id)][0]
    assert pruned(calibration[0]).shape == (8, 6, 5) and "measured allocation" in report["note"]


def test_measured_allocation_falls_back_with_a_warning_when_groups_do_not_splice_apart():
    """With the residual stream pruned too, a consumer's refit depends on two groups: splicing every group of a
    probe does not give its error back, so the one-step pruning is returned, with a warning and the reason."""
    model, calibration, inputs = planted()
    inputs["ignore"] = []
    with pytest.warns(UserWarning, match="kept the one-step isomorphic allocation: splicing every group"):
        pruned = fxprune.prune(model, 0.4, **inputs, **MEASURED)
    report = pruned.meta[REPORT]
    assert report["kept"] == "one-step" and "splicing" in report["reason"] and report["removed"] is None
    assert pruned(calibration[0]).shape == (8, 6, 5)


@pytest.mark.parametrize("options, message", [
    (dict(calibration=None), "needs calibration=.*held-out sequences"),
    (dict(reconstruct=False), "needs reconstruct=True"),
    (dict(isomorphic=False, global_pruning=False), "needs isomorphic=True"),
    (dict(sequential=True), "cannot be combined with sequential"),
    (dict(target_macs=0.5, ratio=None), "cannot be combined with target_macs"),
    (dict(inplace=True), "cannot be combined with inplace"),
    (dict(allocation="greedy"), 'allocation is "one-step" or "measured"'),
    (dict(allocation="one-step", allocation_rounds=2), 'allocation_rounds .* needs allocation="measured"'),
    (dict(allocation_rounds=-1), "allocation_rounds must be a non-negative int"),
])
def test_measured_allocation_names_what_is_missing_or_cannot_combine(options, message):
    model, calibration, inputs = planted()
    settings = {**MEASURED, **inputs, "ratio": 0.4, **options}
    with pytest.raises(ValueError, match=message):
        fxprune.prune(model, settings.pop("ratio"), **settings)


def test_splice_puts_groups_back_and_allocate_finds_the_least_summed_error():
    """Splicing every group of a pruning into the original gives the pruned model's output (so one group spliced
    alone is that group pruned alone); the allocation is the least summed error for the total, as brute force
    finds it; the error curve is scipy's PCHIP where scipy is installed."""
    model, example = models.tiny_transformers("bert")
    (ids,), _ = example(2, 8)
    ignore = [model.embeddings.word_embeddings]
    pruned = fxprune.prune(model, 0.5, example_inputs=(ids,), ignore=ignore, round_to=1)
    dg = fxprune.analyze(model, (ids,), ignore=ignore)
    entries = {find_group(dg, e.key): e for e in plan_of(pruned).groups}
    batch = {"input_ids": ids}
    whole = splice(model, pruned, [(g, e.kept) for g, e in entries.items()])
    torch.testing.assert_close(model_output(whole, batch)[0], model_output(pruned, batch)[0], rtol=1e-4, atol=1e-5)
    group, mlp = next((g, e) for g, e in entries.items() if "encoder.layer.0.intermediate.dense.weight[0]" in e.members)
    alone = splice(model, pruned, [(group, mlp.kept)])
    weight = alone.encoder.layer[0].intermediate.dense.weight
    assert len(mlp.removed) == 64 and not weight[mlp.removed].any()
    torch.testing.assert_close(weight[mlp.kept], pruned.get_parameter("encoder.layer.0.intermediate.dense.weight"))
    untouched = alone.encoder.layer[1].intermediate.dense.weight  # a copy of the original's: equal exactly
    assert torch.equal(untouched, model.encoder.layer[1].intermediate.dense.weight)

    costs = {"a": [0, 1, 5, 9, 20], "b": [0, 2, 3, 4, 30], "c": [0, 0.5, 6, 7, 8]}  # error at 0, 2, 4, 6, 8 units
    curves = {g: (lambda n, c=c: c[n // 2], 8) for g, c in costs.items()}
    got = allocate(curves, 10, {g: 2 for g in costs})
    best = min((p for p in itertools.product(range(5), repeat=3) if 2 * sum(p) == 10),
               key=lambda p: sum(costs[g][k] for g, k in zip(costs, p)))
    assert got == {g: 2 * k for g, k in zip(costs, best)} and sum(got.values()) == 10
    with pytest.raises(ValueError, match="cannot be split in steps of 2"):
        allocate(curves, 9, {g: 2 for g in costs})

    points = {0: 0.0, 2: 0.3, 4: 0.31, 8: 2.0, 16: 1.5}
    f = monotone_cubic(points)
    assert all(f(x) == pytest.approx(y) for x, y in points.items())
    assert all(f(x / 10) <= f((x + 1) / 10) + 1e-12 for x in range(80))  # monotone where the points are
    interpolate = pytest.importorskip("scipy.interpolate", reason="scipy: the reference PCHIP").PchipInterpolator
    reference = interpolate(sorted(points), [points[x] for x in sorted(points)])
    assert all(abs(f(x / 4) - float(reference(x / 4))) < 1e-12 for x in range(65))


def test_in_context_swap_measures_equal_a_prune_with_only_that_group_moved():
    """A group moved by one chunk and spliced into the current pruning has the error of a real prune with only
    that group moved (one-shot refits are per group), and ``swaps`` pairs the cheapest "more" with the most
    valuable "less" of the same class, distinct groups, while the sum is negative."""
    from fxprune.api import _Prober

    model, example = models.tiny_transformers("bert")
    calibration = [{"input_ids": example(10, 12)[0][0]} for _ in range(4)]
    kwargs, ignore = {"input_ids": calibration[0]["input_ids"][:2]}, (model.embeddings.word_embeddings,)
    probe = _Prober(model, None, kwargs, dict(importance="obs-output", ignore=ignore, round_to=1, max_ratio=0.9,
                                              prune_head_dims=False, calibration=calibration, loss_fn=None,
                                              dynamic_shapes=None))

    def prune(counts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return probe.prune(0.0, ratios={g.id: n / g.units for g, n in counts.items() if n})

    removal = {g: g.units // 4 for g in probe.dg.prunable_groups}
    chunks = {g: max(1, g.units // 16) for g in removal}
    current = prune(removal)
    changes = in_context(probe, current, removal, chunks)
    assert len(changes) == 2 * len(removal)
    mlp = max(removal, key=lambda g: g.units)
    for sign in (1, -1):
        moved = prune({g: n + sign * chunks[g] * (g is mlp) for g, n in removal.items()})
        assert abs(changes[(mlp, sign)] - (probe.error(moved) - probe.error(current))) <= 1e-5 * probe.error(current)
    a, b, c = (type("G", (), {"id": i})() for i in range(3))  # three groups, a and b of one class
    synthetic = {(a, 1): 0.1, (a, -1): -0.3, (b, 1): 0.2, (b, -1): -0.05, (c, 1): 0.0, (c, -1): -1.0}
    assert swaps(synthetic, {a: 0, b: 0, c: 1}) == [(b, a, 0.2 - 0.3)]
    assert swaps({**synthetic, (a, -1): -0.1}, {a: 0, b: 0, c: 1}) == []
