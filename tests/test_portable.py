"""``portable=True`` and count ties: a model pruned in place that its library's plain ``from_pretrained`` reloads.

The must-show of issue 19: a LLaMA, a Qwen2 and a GPT-2 pruned with ``portable=True``, saved with
``save_pretrained`` and reloaded with ``from_pretrained`` (no fxprune at load time) compute what the pruned model
computes; the config states every width (no ``fxprune_shapes`` record), and what the config cannot state is frozen
or given back with its reason.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import PlanError
from fxprune.huggingface.config_update import RECORDED
from fxprune.planning.planner import make_plan
from fxprune.planning.ties import CountTie, check_ties, honour_ties
from fxprune.testing import assert_same_outputs, tiny_llama

transformers = pytest.importorskip("transformers")

from tests.hf_models import DECODER, TINY, token_ids  # noqa: E402


def _ids():
    """One example of 6 tokens: batch 1, as users call."""
    return token_ids(batch=1, length=6)


def _reload_plainly(model, tmp_path):
    """``save_pretrained`` then the class's own ``from_pretrained``: no fxprune at load time."""
    assert not any(getattr(model.config, key, None) for key in RECORDED), "the config still needs fxprune records"
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


def _prune(model, ids, ratio=0.3, **kwargs):
    """Prune in place with portable=True; returns the fxprune warnings' messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.prune(model, ratio, example_inputs=(ids,), inplace=True, portable=True, **kwargs)
    assert result is model
    return [str(w.message) for w in caught if "fxprune" in str(w.message)]


# -- count ties in the planner ----------------------------------------------------------------------------------------
def _two_hidden_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    dg = fxprune.analyze(model, (torch.randn(1, 8),))
    first, second = dg.group_of("0.weight", 0), dg.group_of("2.weight", 0)
    return dg, first, second


def test_ties_make_global_plans_lose_the_same_count_lowest_scores_first():
    dg, first, second = _two_hidden_groups()
    scores = {first: np.arange(16, dtype=float), second: np.arange(16, dtype=float) + 1000}  # second: all near its mean
    plain = make_plan([first, second], scores, 0.25, global_pruning=True)
    assert len(plain[first]) == 8 and second not in plain  # the global ranking takes the first group only
    tie = CountTie({first: 1, second: 1}, "one field")
    tied = make_plan([first, second], scores, 0.25, global_pruning=True, ties=[tie])
    assert len(tied[first]) == len(tied[second]) == 4  # the mean of 8 and 0
    assert list(tied[first]) == [0, 1, 2, 3] and list(tied[second]) == [0, 1, 2, 3]  # each its lowest scores
    scaled = honour_ties({first: np.arange(6)}, [CountTie({first: 2, second: 1}, "n_embd")], scores)
    assert len(scaled[first]) == 2 * len(scaled[second]) == 4  # 6 units over multipliers 2 + 1: k = 2
    assert check_ties({first: [0, 1], second: [0]}, [tie]) and not check_ties({first: [0], second: [3]}, [tie])


def test_ties_honour_steps_and_keep_a_unit():
    dg, first, second = _two_hidden_groups()
    scores = {first: np.arange(16, dtype=float), second: np.arange(16, dtype=float)}
    tie = CountTie({first: 1, second: 1}, "one field")
    plan = honour_ties({first: np.arange(7), second: np.arange(3)}, [tie], scores, steps={first: 4, second: 4})
    assert len(plan[first]) == len(plan[second]) == 4  # mean 5, rounded to the step of 4
    plan = honour_ties({first: np.arange(15), second: np.arange(15)}, [tie], scores, steps={first: 4, second: 4})
    assert len(plan[first]) == 12  # 15 would leave one unit, but steps of 4 stop at 12


# -- Hugging Face: plain from_pretrained ------------------------------------------------------------------------------
def test_llama_portable_reloads_with_plain_from_pretrained_and_fits_hidden_to_heads(tmp_path):
    """The issue's LLaMA at half its widths: hidden 128, 8 heads of 32 over 4 kv heads, MLP 256, at 0.3. The plan
    (hidden 88, 3 kv heads, 1 query per kv head) is one LlamaConfig refuses (88 % 3 heads, even with head_dim
    set); one kv head per layer comes back."""
    model = tiny_llama(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                       head_dim=32, num_hidden_layers=2)
    ids = _ids()
    messages = _prune(model, ids)
    c = model.config
    assert any("not a multiple of the number of attention heads" in m and "given back" in m for m in messages)
    assert (c.hidden_size, c.intermediate_size, c.num_key_value_heads) == (88, 176, 4)
    assert c.hidden_size % c.num_attention_heads == 0 and c.num_attention_heads % c.num_key_value_heads == 0
    assert all(layer.mlp.up_proj.out_features == 176 for layer in model.model.layers)  # the same in every layer
    reloaded = _reload_plainly(model, tmp_path)
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_qwen2_portable_global_plan_is_uniform_and_adds_the_head_dim_its_attention_reads(tmp_path):
    """Qwen2's config has no head_dim (its attention reads getattr(config, "head_dim", hidden // heads)): the
    field is added, so the hidden size is pruned without dragging the head width along; a global plan (per-layer
    widths otherwise) is tied to one width per field."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER)).eval()
    ids = _ids()
    dg = fxprune.analyze(model, (ids,), inplace=True, portable=True)
    assert dg.portable.added == {("head_dim",): 16}
    mlp = {dg.group_of(f"model.layers.{i}.mlp.up_proj.weight", 0) for i in range(2)}
    assert any(set(tie.members) == mlp for tie in dg.count_ties)
    _prune(model, ids, None, global_pruning=True, target_params=0.7)
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) == 1 and model.config.intermediate_size == widths.pop()
    assert model.config.head_dim == 16
    reloaded = _reload_plainly(model, tmp_path)
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)


def test_gpt2_portable_prunes_heads_with_16_hidden_units_each(tmp_path):
    """GPT-2 derives the head size from n_embd / n_head: heads go only with 16 hidden units each (one tie). Its
    n_inner is None (the MLP is 4 x n_embd): it is set to the MLP width, so the MLP is pruned on its own."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_head=4, n_layer=2, n_positions=32, vocab_size=100, bos_token_id=0, eos_token_id=0)).eval()
    ids = _ids()
    dg = fxprune.analyze(model, (ids,), inplace=True, portable=True)
    hidden = dg.group_of("transformer.ln_f.weight", 0)
    tie = next(t for t in dg.count_ties if hidden in t.members)
    assert tie.members[hidden] == 16 and sorted(tie.members.values()) == [1, 1, 16] and "n_embd" in tie.reason
    assert dg.portable.added == {("n_inner",): 256}
    _prune(model, ids)
    c = model.config
    assert c.n_embd == 16 * c.n_head < 64 and c.n_inner < 256
    assert model.transformer.h[1].attn.c_attn.weight.shape == (c.n_embd, 3 * c.n_embd)
    reloaded = _reload_plainly(model, tmp_path)
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)


def test_bert_heads_frozen_with_the_reason_and_mlp_reloads(tmp_path):
    """BertModel in place: the hidden size is the graph's output, and hidden_size also states the query width
    (heads x 16): heads stay whole, with a reason in the report; the MLP is pruned and reloads."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, **TINY)).eval()
    ids = _ids()
    dg = fxprune.analyze(model, (ids,), inplace=True, portable=True)
    heads = dg.groups_of("encoder.layer.0.attention.self.query.weight", 0)[0]
    assert heads.units == 4 and any(r.startswith("portable: BertConfig.hidden_size also states") for r in heads.frozen)
    assert "portable: " in dg.report()
    _prune(model, ids)
    assert model.config.intermediate_size < 128 and model.config.num_attention_heads == 4
    reloaded = _reload_plainly(model, tmp_path)
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_apply_refuses_a_removal_that_breaks_a_tie():
    model = tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    dg = fxprune.analyze(model, (_ids(),), inplace=True, portable=True)
    mlp0 = dg.group_of("model.layers.0.mlp.up_proj.weight", 0)
    with pytest.raises(PlanError, match="breaks count ties"):
        fxprune.apply(dg, {mlp0: list(range(8))}, inplace=True)
    mlp1 = dg.group_of("model.layers.1.mlp.up_proj.weight", 0)
    fxprune.apply(dg, {mlp0: list(range(8)), mlp1: list(range(8, 16))}, inplace=True)
    assert model.config.intermediate_size == 120


def test_without_portable_per_layer_widths_warn_that_plain_from_pretrained_will_not_load(tmp_path):
    model = tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    ids = _ids()
    dg = fxprune.analyze(model, (ids,), inplace=True)
    mlp0 = dg.group_of("model.layers.0.mlp.up_proj.weight", 0)
    with pytest.warns(UserWarning, match="plain from_pretrained .* will not load .* portable=True"):
        fxprune.apply(dg, {mlp0: list(range(8))}, inplace=True)
    assert model.config.fxprune_shapes
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception):  # the plain loader refuses the per-layer widths
        type(model).from_pretrained(tmp_path)


def test_portable_needs_a_config():
    with pytest.raises(ValueError, match="no config"):
        fxprune.prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.3,
                      example_inputs=(torch.randn(1, 4),), portable=True)


def test_prune_checkpoint_portable_reloads_with_plain_from_pretrained(tmp_path):
    """Shard by shard (the model never loaded), a portable plan: config.json states it, from_pretrained reads it."""
    model = tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    plan = fxprune.prune_checkpoint(tmp_path / "src", tmp_path / "out", 0.3, global_pruning=True, portable=True,
                                    progress=False)
    assert plan.settings["portable"]
    reloaded = type(model).from_pretrained(tmp_path / "out").eval()
    config = reloaded.config
    assert not any(getattr(config, key, None) for key in RECORDED)
    assert config.hidden_size % config.num_attention_heads == 0
    assert len({layer.mlp.up_proj.out_features for layer in reloaded.model.layers}) == 1
    in_memory = tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.replay(plan, in_memory, inplace=True)  # the same plan in memory: the same model
    with torch.no_grad():
        assert_same_outputs(reloaded(_ids()).logits, in_memory(_ids()).logits)
