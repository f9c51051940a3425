"""Hugging Face mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): whole experts, expert and
shared-expert MLP units, the dead-unit oracle per experts implementation, in place, save and reload.

Checked on Mixtral and Qwen2-MoE (4 experts, top-2): whole experts (router rows + both expert weights; against the
model built with fewer experts; never fewer than top-k), the experts' MLP units (one group across the experts: a 3-d
expert weight stays rectangular) and the shared expert's, the dead-unit oracle with grouped-matmul, ``batched_mm``
and eager experts, in place generate, save and reload.
"""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.testing import assert_same_outputs, plant_dead_units, run_oracle, tiny_moe
from tests.models import first_output

transformers = pytest.importorskip("transformers")
from tests.hf_models import token_ids  # noqa: E402 (after the importorskip)


def _moe(name, implementation=None):
    """A tiny mixture-of-experts decoder: 4 experts, top-2, one layer (Qwen2-MoE with a shared expert)."""
    return tiny_moe(name, implementation)


def _expert_units(dg):
    """The experts' MLP units (one group across the experts: a 3-d expert weight stays rectangular)."""
    down = "model.layers.0.mlp.experts.down_proj"
    return dg.group_of(down, 2)


# grouped matmul (the default), W[ids] + bmm, and the per-expert loop over data (captured as grouped matmul)
@pytest.mark.parametrize("implementation", [None, "batched_mm", "eager"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_expert_and_shared_expert_units_dead_units_are_exact(name, implementation):
    model = _moe(name, implementation)
    default = model.config._experts_implementation  # grouped_mm (transformers 5.24), eager (5.0)
    ids = token_ids()
    dg = fxprune.analyze(model, (ids,))
    assert not dg.state.unsupported, dg.report()
    units = _expert_units(dg)
    width = 48 if name == "mixtral" else 24
    assert units.units == width and units.prunable
    assert dg.describe(dg.layout_of("model.layers.0.mlp.experts.gate_up_proj", 1)) == \
        f"(G{units.id}({width}) ++ G{units.id}({width}))"  # gate and up halves, unit by unit
    hidden = dg.group_of("model.embed_tokens.weight", 1)  # the residual stream reaches the router and the experts
    assert dg.group_of("model.layers.0.mlp.gate.weight", 1) is hidden
    assert dg.group_of("model.layers.0.mlp.experts.down_proj", 1) is hidden and not hidden.frozen
    experts = dg.group_of("model.layers.0.mlp.gate.weight", 0)  # router rows and both expert weights
    assert experts.units == 4 and experts.prunable and experts.min_kept == 2
    assert dg.group_of("model.layers.0.mlp.experts.gate_up_proj", 0) is experts
    assert dg.group_of("model.layers.0.mlp.experts.down_proj", 0) is experts
    chosen = [units]
    if name == "qwen2_moe":
        shared = dg.group_of("model.layers.0.mlp.shared_expert.up_proj.weight", 0)
        assert shared.units == 40 and shared.prunable
        assert dg.group_of("model.layers.0.mlp.shared_expert.down_proj.weight", 1) is shared
        chosen.append(shared)
    with torch.no_grad():
        _, removal, pruned = run_oracle(model, (ids,))  # every group but the RMS-normalised hidden size
    assert sorted(g.units for g in removal if g.units in (width, 40)) == sorted(g.units for g in chosen)
    assert pruned.get_parameter("model.layers.0.mlp.experts.down_proj").shape[2] < width
    assert model.config._experts_implementation == (implementation or default)  # put back after capture


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_in_place_generates_and_reloads(name, tmp_path):
    model = _moe(name)
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    removal = plant_dead_units(dg)
    assert _expert_units(dg) in removal
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        logits = model(ids).logits
    assert fxprune.apply(dg, removal, inplace=True) is model
    experts = model.model.layers[0].mlp.experts
    width = experts.down_proj.shape[2]
    assert width < (48 if name == "mixtral" else 24) and experts.intermediate_dim == width
    assert not dg.state.unsupported, dg.report()
    key = "intermediate_size" if name == "mixtral" else "moe_intermediate_size"
    assert getattr(model.config, key) == width
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)
        assert_same_outputs(model(ids).logits, logits)
    model.save_pretrained(tmp_path / "dead")  # transformers saves experts one by one; loading stacks them again
    assert_same_outputs(fxprune.load_pretrained(str(tmp_path / "dead"))(ids).logits, logits)

    smaller = _moe(name)  # a plain ratio: the hidden size and experts too, every width uniform: the config says all
    fxprune.prune(smaller, 0.5, example_inputs=(ids,), inplace=True)
    assert smaller.config.hidden_size == 16 and smaller.model.layers[0].mlp.gate.hidden_dim == 16
    count = "num_local_experts" if name == "mixtral" else "num_experts"
    assert getattr(smaller.config, count) == 2 == smaller.num_experts == smaller.model.layers[0].mlp.experts.num_experts
    if name == "qwen2_moe":
        assert smaller.config.shared_expert_intermediate_size < 40
    with torch.no_grad():
        logits = smaller(ids).logits
        smaller.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    smaller.save_pretrained(tmp_path / "ratio")
    reloaded = type(smaller).from_pretrained(tmp_path / "ratio").eval()
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, logits)


@pytest.mark.parametrize("implementation", [None, "batched_mm"])  # expert ids as offsets' bins / as W[ids]
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_whole_experts_match_the_model_built_with_fewer_and_keep_top_k(name, implementation):
    """Removing expert 1 (router row, its slices of both expert weights) is the model built with 3 experts and
    the other weights; more than ``num_experts - top_k`` experts never go."""
    model, ids = _moe(name, implementation), token_ids()
    dg = fxprune.analyze(model, (ids,))
    experts = dg.group_of("model.layers.0.mlp.gate.weight", 0)
    config = model.config.to_dict()
    count = "num_local_experts" if name == "mixtral" else "num_experts"
    config[count] = 3
    fewer = type(model)(type(model.config).from_dict(config)).eval()
    state = model.state_dict()
    fewer.load_state_dict({k: v[[0, 2, 3]] if ".mlp.gate." in k or ".mlp.experts." in k else v
                           for k, v in state.items()})
    with torch.no_grad():
        pruned = fxprune.apply(dg, {experts: [1]})
        assert_same_outputs(first_output(pruned(ids)), fewer(ids).logits)
    with pytest.raises(fxprune.PlanError, match="must keep at least 2 of its 4 units"):
        fxprune.apply(dg, {experts: [0, 1, 2]})
    with pytest.warns(UserWarning, match="keeps at least 2"):
        smaller = fxprune.prune(model, 0.3, example_inputs=(ids,), ratios={model.model.layers[0].mlp.gate: 0.9})
    assert smaller.get_parameter("model.layers.0.mlp.gate.weight").shape[0] == 2


def test_moe_non_uniform_in_place_reloads_with_load_pretrained(tmp_path):
    """One layer loses an expert, the other expert MLP units: recorded in ``fxprune_shapes``; transformers saves
    the experts one by one, and ``load_pretrained`` lets its loader stack them into the resized 3-d tensors."""
    model = _moe("mixtral")
    model = type(model)(type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": 2})).eval()
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    removal = plant_dead_units(dg, groups=[dg.group_of("model.layers.1.mlp.experts.down_proj", 2)])
    removal[dg.group_of("model.layers.0.mlp.gate.weight", 0)] = [3]
    fxprune.apply(dg, removal, inplace=True)
    assert model.config.fxprune_shapes["model.layers.0.mlp.experts.down_proj"] == [3, 32, 48]
    assert model.model.layers[0].mlp.experts.num_experts == 3 == model.model.layers[0].mlp.gate.num_experts
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape == (3, 96, 32)
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, logits)
        reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
