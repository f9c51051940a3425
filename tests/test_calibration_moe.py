"""Calibration of mixture-of-experts weights: per-expert statistics of the tokens routed to each expert (grouped
matmul over offsets and ``batched_mm``'s gathered weights), expert-MLP and whole-expert scores from them, and the
expert-by-expert refit checked by a redundant-unit oracle.

Checked on tiny Mixtral and Qwen2-MoE (``fxprune.testing.tiny_moe``, grouped matmul and ``batched_mm``): per-expert
counts and Gram matrices against the rows a hook sees routed to each expert; the redundant-unit oracle (expert-MLP
units copying kept ones in every expert: the output changes without the refit and comes back with it); ``obs``
ranking the copies lowest where L2 does not; data scores for units and whole experts; experts and units removed in
place with the refit; no magnitude-fallback warning for MoE, one for a transposed-convolution consumer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.calibration import calibrated_consumers, collect_statistics, reconstruct
from fxprune.importance import resolve_importance, score_groups
from fxprune.testing import assert_close_to_scale

transformers = pytest.importorskip("transformers")
from fxprune.testing import tiny_moe  # noqa: E402  (after the skip: it builds transformers models)
from tests.hf_models import token_ids  # noqa: E402

EXPERTS = "model.layers.0.mlp.experts"
IMPLEMENTATIONS = [None, "batched_mm"]  # grouped matmul over offsets (transformers' default) / W[ids] then bmm


def _routed(model, batches):
    """Brute force: per expert, the rows of the experts module's input routed to it (from its top-k ids)."""
    seen = []
    hook = model.get_submodule(EXPERTS).register_forward_hook(lambda m, args, out: seen.append(args[:2]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    hook.remove()
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h, _ in seen]).double()
    ids = torch.cat([i.reshape(len(h.reshape(-1, h.shape[-1])), -1) for h, i in seen])
    return [x[(ids == e).any(1)] for e in range(4)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_expert_weights_are_consumers_with_each_experts_tokens(name, implementation):
    """Both expert weights are consumers (gate_up_proj of the hidden size, down_proj of the expert-MLP units);
    expert e's statistics are those of the tokens routed to e, counted tokens x top-k over the experts."""
    model = tiny_moe(name, implementation)
    batches = [token_ids(2, 7, seed) for seed in (1, 2)]
    dg = fxprune.analyze(model, (batches[0],))
    consumers = calibrated_consumers(dg)
    for weight in ("gate_up_proj", "down_proj"):
        c = consumers[f"{EXPERTS}.{weight}"]
        assert (c.experts, c.in_axis, c.out_axis, len(c.calls), len(c.routes)) == (4, 2, 1, 1, 1)
    assert dg.group_of(f"{EXPERTS}.down_proj", 2) in consumers[f"{EXPERTS}.down_proj"].groups
    stats = collect_statistics(dg, batches, gram=True)
    gate_up = stats[f"{EXPERTS}.gate_up_proj"]
    routed = _routed(model, batches)
    assert [s.count for s in gate_up.experts] == [len(r) for r in routed]
    assert gate_up.count == 2 * 7 * 2 * 2 == stats[f"{EXPERTS}.down_proj"].count  # tokens x top-k
    assert [s.count for s in stats[f"{EXPERTS}.down_proj"].experts] == [len(r) for r in routed]
    for s, rows in zip(gate_up.experts, routed):
        assert_close_to_scale(s.gram[:-1, :-1], rows.T @ rows / len(rows), atol=1e-6)
        assert_close_to_scale(s.mean, rows.mean(0), atol=1e-6)


def _plant_copies(model, copies: dict) -> None:
    """Expert-MLP unit k computes what unit ``copies[k]`` computes, in every expert (gate and up rows copied)."""
    experts = model.get_submodule(EXPERTS)
    width = experts.down_proj.shape[2]
    with torch.no_grad():
        for k, m in copies.items():
            experts.gate_up_proj[:, k] = experts.gate_up_proj[:, m]
            experts.gate_up_proj[:, width + k] = experts.gate_up_proj[:, width + m]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_reconstruction_removes_planted_redundant_expert_units_exactly(name, implementation):
    """Removing expert-MLP units that copy kept ones changes the output; the refit of each expert's down_proj on
    its own tokens moves their columns onto the copies, so the output comes back."""
    model = tiny_moe(name, implementation)
    _plant_copies(model, {3: 7, 10: 1})
    batches = [token_ids(4, 16, seed) for seed in range(1, 5)]
    test = token_ids(2, 9, 99)
    dg = fxprune.analyze(model, (batches[0],))
    removal = {dg.group_of(f"{EXPERTS}.down_proj", 2): [3, 10]}
    with torch.no_grad():
        expected = model(test).logits
        pruned = fxprune.apply(dg, removal)
        with pytest.raises(AssertionError):  # without the refit the copies' contributions are missing
            assert_close_to_scale(pruned(test)[0], expected, atol=1e-4)
        assert reconstruct(dg, removal, pruned, batches, damping=1e-9) == [f"{EXPERTS}.down_proj"]
        assert_close_to_scale(pruned(test)[0], expected, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_obs_ranks_redundant_expert_units_lowest_and_scores_are_not_magnitude(implementation):
    """``obs`` scores the planted copies (and their sources) near 0, which magnitude cannot see; ``activation``,
    ``wanda`` and ``obs`` score expert-MLP units and whole experts from the data, not by magnitude."""
    model = tiny_moe("mixtral", implementation)
    _plant_copies(model, {3: 7, 10: 1})
    batches = [token_ids(4, 16, seed) for seed in range(1, 5)]
    dg = fxprune.analyze(model, (batches[0],))
    units = dg.group_of(f"{EXPERTS}.down_proj", 2)
    experts = dg.group_of("model.layers.0.mlp.gate.weight", 0)
    scores = {c: score_groups(resolve_importance(c, batches), dg, [units, experts])
              for c in ("obs", "activation", "wanda", "l2")}
    assert sorted(np.argsort(scores["obs"][units])[:4]) == [1, 3, 7, 10]
    assert sorted(np.argsort(scores["l2"][units])[:4]) != [1, 3, 7, 10]
    for criterion in ("activation", "wanda", "obs"):
        for group in (units, experts):
            assert not np.allclose(scores[criterion][group], scores["l2"][group], rtol=0.05)



def test_whole_experts_and_units_refit_in_place_lowers_the_error():
    """A plan that removes experts and expert-MLP units: the kept experts are refit (sliced to the kept
    experts), in place into the Hugging Face model, and the output error falls."""
    batches = [token_ids(4, 16, seed) for seed in range(1, 5)]
    test = token_ids(2, 9, 99)
    errors, down = [], []
    for refit in (False, True):
        model = tiny_moe("qwen2_moe")
        with torch.no_grad():
            expected = model(test).logits
        fxprune.prune(model, 0.3, example_inputs=(batches[0],), importance="wanda", calibration=batches,
                      reconstruct=refit, inplace=True, ratios={model.model.layers[0].mlp.gate: 0.5})
        experts = model.get_submodule(EXPERTS)
        assert experts.down_proj.shape[0] == 2 and experts.down_proj.shape[2] < 24
        down.append(experts.down_proj.detach().clone())
        with torch.no_grad():
            errors.append(float((model(test).logits - expected).square().mean()))
    assert not torch.allclose(down[0], down[1], atol=1e-3)  # the kept experts' down_proj were refit
    assert errors[1] < 0.95 * errors[0]


def test_no_magnitude_fallback_warning_for_experts_but_for_other_uncalibrated_consumers():
    """The mixture-of-experts model has every prunable group calibrated: no warning. A group read only by a
    transposed convolution (not calibrated) is scored by magnitude, and says so."""
    model = tiny_moe("qwen2_moe", "batched_mm")
    batches = [token_ids(2, 7, 1)]
    dg = fxprune.analyze(model, (batches[0],))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*magnitude")
        for criterion in ("activation", "obs"):
            score_groups(resolve_importance(criterion, batches), dg, dg.prunable_groups)

    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 3, 3)).eval()
    x = torch.randn(2, 2, 6, 6)
    dg = fxprune.analyze(net, (x,))
    with pytest.warns(UserWarning, match=r"1 prunable group\(s\) have no calibrated consumer .* L2 weight magnitude"):
        score_groups(resolve_importance("activation", [x]), dg, dg.prunable_groups)
