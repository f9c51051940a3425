"""``target_latency``: per-layer latency tables, the greedy allocation, and the measured target (issue 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.planning.latency import LayerTable, monotone, ratio_of, weighted_layers
from fxprune.planning.latency_target import LatencyEstimate, allocate


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def test_table_interpolates_bilinearly_and_tables_are_monotone():
    table = LayerTable("w", np.array([8, 16]), np.array([4, 8]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert table.at(8, 4) == 1.0 and table.at(16, 8) == 4.0 and table.at(12, 6) == pytest.approx(2.5)
    noisy = monotone(np.array([[5.0, 2.0], [1.0, 4.0]]))  # a slow narrow cell and a fast wide one
    assert (np.diff(noisy, axis=0) >= 0).all() and (np.diff(noisy, axis=1) >= 0).all() and noisy[1, 1] > noisy[0, 0]
    model = small_cnn()
    dg = fxprune.analyze(model, (torch.randn(2, 3, 16, 16),))
    layers = weighted_layers(dg.gm)
    assert [l.kind for l in layers] == ["conv"] * 4 + ["linear"] and layers[3].depthwise
    estimate = LatencyEstimate(dg, alignment=16)
    for table, _, _ in estimate.entries:
        assert (np.diff(table.seconds, axis=0) >= 0).all() and (np.diff(table.seconds, axis=1) >= 0).all()


def staircase(layer, out, inp, device, dtype):
    """A made-up latency: proportional to the MACs, with a step at every 32 output channels."""
    return 1e-6 * (-(-out // 32) * 32) * inp * (1 if layer.depthwise else 9)


def test_allocation_reaches_the_estimated_budget_in_aligned_steps():
    model = small_cnn()
    dg = fxprune.analyze(model, (torch.randn(2, 3, 16, 16),))
    estimate = LatencyEstimate(dg, alignment=16, timer=staircase)
    groups = dg.prunable_groups
    scores = {g: np.arange(g.units, dtype=float) + 1 for g in groups}  # unit 0 is the least important
    steps = {g: 16 for g in groups}
    full = estimate.total({})
    removal = allocate(estimate, groups, scores, steps, 0.5 * full)
    kept = {g.atom: g.units - len(u) for g, u in removal.items()}
    assert 0.4 * full <= estimate.total(kept) <= 0.5 * full  # on the budget, not far below it
    assert all(len(u) % 16 == 0 for u in removal.values())
    assert all(list(u) == list(range(len(u))) for u in removal.values())  # lowest scores go first


def test_target_latency_on_a_small_cnn_lands_within_ten_percent():
    torch.set_num_threads(1)  # one thread: steadier timings on a shared machine
    try:
        model, x = small_cnn(), (torch.randn(8, 3, 32, 32),)
        pruned = fxprune.prune(model, target_latency=0.5, example_inputs=x)
        info = pruned.meta["fxprune_latency"]
        assert info["target"] == 0.5 and len(info["tries"]) >= 1
        # the search's own measurement (the pruned model against the original, alternating, in this run)
        assert abs(info["measured"] - 0.5) <= 0.05, info
        # measured again independently: a shared VM's timings of a 20 ms model drift by about 15% between
        # runs, so this one only guards against a search that reports what it did not reach
        again = ratio_of(pruned, model, x, rounds=16)
        assert abs(again - 0.5) <= 0.15, (again, info)
        with torch.no_grad():
            assert pruned(*x).shape == (8, 10)
    finally:
        torch.set_num_threads(2)


def test_target_latency_needs_inputs_and_one_target():
    with pytest.raises(ValueError, match="example_inputs"):
        fxprune.prune(small_cnn(), target_latency=0.5)
    with pytest.raises(ValueError, match="not both"):
        fxprune.prune(small_cnn(), target_latency=0.5, target_macs=0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
