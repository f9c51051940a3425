"""fxprune.prune_checkpoint: a sharded Hugging Face checkpoint pruned one tensor at a time, without loading it.

Checked on a tiny LLaMA saved in 20KB shards: the plan and the reloaded logits equal in-place ``prune``'s (uniform
widths through ``from_pretrained``; ``global_pruning``, ``isomorphic``, ``ratios`` and ``plan=`` through
``load_pretrained``); written tensors equal the in-memory model's; tied and untied embeddings/heads; no earlier
source tensor alive when the next is read (an instrumented ``Checkpoint.read``); errors; ``--streaming``.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

import fxprune
from fxprune.io.checkpoint.shards import Checkpoint
from fxprune.testing import assert_same_outputs, kept_units, tiny_llama
from tests.models import CHECKPOINT_LLAMA, saved_tiny_llama

transformers = pytest.importorskip("transformers")
if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 4):
    # transformers 5.0-5.3: LLaMA's rotary embedding asks torch.autocast about the meta device, which torch refuses
    pytest.skip("a LLaMA on the meta device needs transformers >= 5.4 (README: tested versions)",
                allow_module_level=True)
from tests.hf_models import token_ids  # noqa: E402 (after the skip: it imports transformers)

def _in_memory(model, ratio=0.5, **options):
    """The same model pruned in memory, in place (the reference); returns its plan."""
    fxprune.prune(model, ratio, example_inputs=(token_ids(),), inplace=True, **options)
    return fxprune.plan_of(model)


def _logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


def test_sharded_checkpoint_pruned_like_the_model_in_memory(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src)
    assert len(list(src.glob("*.safetensors"))) >= 2
    plan = fxprune.prune_checkpoint(src, out, ratio=0.5, progress=False)
    reference = _in_memory(model)
    assert kept_units(plan) == kept_units(reference)
    assert any(len(g.kept) < g.units for g in plan.groups)
    assert len(list(out.glob("*.safetensors"))) >= 2 and (out / "model.safetensors.index.json").exists()
    assert (out / "generation_config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    c = reloaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (32, 64, 1, 1)
    assert not getattr(c, "fxprune_shapes", None)  # uniform widths: the plain config describes the model
    assert_same_outputs(_logits(reloaded), _logits(model))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(Checkpoint(src).keys())


def test_plan_argument_writes_the_same_checkpoint(tmp_path):
    src = tmp_path / "src"
    model = saved_tiny_llama(src)
    reference = _in_memory(model, global_pruning=True)  # non-uniform: kept units differ per layer
    reference.save(tmp_path / "plan.json")
    fxprune.prune_checkpoint(src, tmp_path / "a", plan=reference, progress=False)
    again = fxprune.prune_checkpoint(src, tmp_path / "b", plan=str(tmp_path / "plan.json"), progress=False)
    assert kept_units(again) == kept_units(reference)
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert a.keys() == b.keys()
    expected = model.state_dict()
    for key in a.keys():  # slicing copies: the written tensors are the in-memory model's, bit for bit
        assert torch.equal(a.read(key), b.read(key)) and torch.equal(a.read(key), expected[key]), key
    assert json.loads((tmp_path / "a" / "config.json").read_text())["fxprune_shapes"]  # widths differ per layer
    reloaded = fxprune.load_pretrained(str(tmp_path / "a"))
    assert_same_outputs(_logits(reloaded), _logits(model))


def test_non_uniform_widths_are_recorded_and_reload(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src)
    ratios = {"model.layers.1.mlp.up_proj": 0.25}
    fxprune.prune_checkpoint(src, out, ratio=0.5, ratios=ratios, progress=False)
    _in_memory(model, ratios=ratios)
    config = json.loads((out / "config.json").read_text())
    assert config["fxprune_shapes"]["model.layers.1.mlp.up_proj.weight"] == [96, 32]
    reloaded = fxprune.load_pretrained(str(out))
    assert reloaded.model.layers[0].mlp.up_proj.out_features == 64
    assert_same_outputs(_logits(reloaded), _logits(model))


def test_at_most_one_source_tensor_is_held(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    saved_tiny_llama(src)
    total = sum(Checkpoint(src).read(k).nbytes for k in Checkpoint(src).keys())
    alive, reads, largest_held = [], [], [0]
    read = Checkpoint.read

    def tracked(self, name):
        held = [r() for r in alive if r() is not None]
        largest_held[0] = max(largest_held[0], sum(t.nbytes for t in held))
        assert not held, f"reading {name} while {len(held)} earlier tensors are alive"
        tensor = read(self, name)
        alive.append(weakref.ref(tensor))
        reads.append(name)
        return tensor

    monkeypatch.setattr(Checkpoint, "read", tracked)
    fxprune.prune_checkpoint(src, out, ratio=0.5, progress=False)
    keys = Checkpoint(src).keys()
    # every tensor is read once to score (all are members of a pruned group here) and once to be written
    assert sorted(reads) == sorted(keys * 2)
    assert largest_held[0] == 0 and total > 200_000


def test_tied_embeddings_stay_tied(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src, tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(src)
    plan = fxprune.prune_checkpoint(src, out, ratio=0.5, progress=False)
    assert kept_units(plan) == kept_units(_in_memory(model))
    assert "lm_head.weight" not in Checkpoint(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.shape == (100, 32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert_same_outputs(_logits(reloaded), _logits(model))


def test_untied_embedding_and_head_lose_the_same_hidden_channels(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    saved_tiny_llama(src)
    plan = fxprune.prune_checkpoint(src, out, ratio=0.5, progress=False)
    hidden = next(g for g in plan.groups if "model.embed_tokens.weight[1]" in g.members)
    assert "lm_head.weight[1]" in hidden.members and len(hidden.kept) == 32
    before, after = Checkpoint(src), Checkpoint(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after.read(name), before.read(name)[:, hidden.kept]), name  # slicing copies


def test_clear_errors(tmp_path):
    src = tmp_path / "src"
    saved_tiny_llama(src)
    with pytest.raises(ValueError, match="importance='activation' needs calibration batches"):
        fxprune.prune_checkpoint(src, tmp_path / "out", ratio=0.5, importance="activation")
    with pytest.raises(ValueError, match="plan= or a ratio"):
        fxprune.prune_checkpoint(src, tmp_path / "out", ratio=0.5, plan=tmp_path / "plan.json")
    with pytest.raises(ValueError, match="source folder"):
        fxprune.prune_checkpoint(src, src, ratio=0.5)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fxprune.prune_checkpoint(no_config, tmp_path / "out", ratio=0.5)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors shard"):
        fxprune.prune_checkpoint(no_weights, tmp_path / "out", ratio=0.5)


def test_command_line_streaming(tmp_path, capsys):
    from fxprune.cli import commands as cli

    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src)
    code = cli.main(["prune", f"hf:{src}", "--ratio", "0.5", "--streaming", "--quiet", "--out", str(out),
                     "--plan", str(tmp_path / "plan.json"), "--max-shard-size", "30KB"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pruned shard by shard" in captured.out and "parameters" in captured.out
    assert kept_units(fxprune.PruningPlan.load(tmp_path / "plan.json")) == kept_units(_in_memory(model))
    assert max(p.stat().st_size for p in out.glob("*.safetensors")) < 40_000
    assert_same_outputs(_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval()), _logits(model))
    code = cli.main(["prune", f"hf:{src}", "--ratio", "0.5", "--streaming", "--distill-steps", "2", "--quiet"])
    assert code == 1 and "--distill-steps need(s) the model loaded" in capsys.readouterr().err


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_llama(**CHECKPOINT_LLAMA).to(torch.bfloat16)
    model.save_pretrained(src, max_shard_size="20KB")
    plan = fxprune.prune_checkpoint(src, out, ratio=0.5, progress=False)
    assert kept_units(plan) == kept_units(_in_memory(model))  # scored on the bfloat16 weights, as the loaded model is
    written = Checkpoint(out)
    assert {written.dtype(k) for k in written.keys()} == {torch.bfloat16}
    expected = model.state_dict()
    assert all(torch.equal(written.read(k), expected[k]) for k in written.keys())


@pytest.mark.parametrize("options", [dict(target_params=0.6), dict(ratio=0.4, importance="lamp", global_pruning=True),
                                     dict(ratio=0.4, global_pruning=True, isomorphic=True)])
def test_targets_and_global_ranking_plan_as_in_memory(tmp_path, options):
    src = tmp_path / "src"
    model = saved_tiny_llama(src)
    plan = fxprune.prune_checkpoint(src, tmp_path / "out", progress=False, **options)
    ratio = options.pop("ratio", None)
    assert kept_units(plan) == kept_units(_in_memory(model, ratio, **options))
