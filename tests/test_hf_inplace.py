"""Hugging Face models pruned in place: config, attributes and buffers written back, generate, save and reload
(``load_pretrained``), and the model put back when something fails.

Checked: Falcon's query heads pruned in place and its ALiBi heads kept whole with the reason (generate, reload);
fused q|k|v under other names (GPT-NeoX, Phi-3); a stale head count caught by the comparison with the pruned graph;
identical reloads of OPT, BART, Marian (hidden size pruned too), Falcon, Gemma 1-3, OLMo, XGLM (also its hidden size
alone); Phi-3 with per-layer head counts a clear error; Wav2Vec2 (GroupNorm groups, weight-norm conv groups); OLMo
with the hidden size and the query width shrinking apart; CodeGen and T5 keeping attention widths a rebuild would
move (``unfollow``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxprune
from fxprune.testing import assert_same_outputs, plant_dead_units

transformers = pytest.importorskip("transformers")
from tests.hf_models import TINY, alibi_or_multi_query, tiny_decoder, token_ids  # noqa: E402 (after the importorskip)


@pytest.mark.parametrize("name", ["bloom", "falcon_multi_query", "falcon_kv1", "mpt"])
def test_alibi_and_multi_query_in_place_generate_and_reload(name, tmp_path):
    """Falcon's query heads are pruned in place (the one k/v head kept). ALiBi slopes are recomputed from the head
    count by the model's own forward (pruning head i changes the others' slopes), so in place the heads stay whole,
    with the reason, while the MLP units and the hidden size are pruned."""
    torch.manual_seed(0)
    model = alibi_or_multi_query(name).eval()
    original = copy.deepcopy(model)
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    heads = [g for g in dg.groups if g.units == 4 and any(m.dim == 0 and ".0." in m.name and "dense" not in m.name
                                                          and m.name.endswith(("query_key_value.weight", "Wqkv.weight"))
                                                          for m in g.members)]
    alibi = name in ("bloom", "mpt")
    assert heads and all((not g.prunable) == alibi for g in heads), dg.report()
    if alibi:
        assert all(any("computed in forward from constants" in r for r in g.frozen) for g in heads)
    assert fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True) is model
    config = model.config
    assert (getattr(config, "n_head", None) or config.num_attention_heads) == 4 if alibi else \
        config.num_attention_heads < 4
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in original.parameters())
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_inplace_generate_with_dead_units_gives_the_same_tokens(cls_name, tmp_path):
    torch.manual_seed(0)
    model = tiny_decoder(cls_name)
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    removal = plant_dead_units(dg)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        logits = model(ids).logits
    result = fxprune.apply(dg, removal, inplace=True)
    assert result is model and isinstance(model, transformers.PreTrainedModel)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), tokens)
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 1
    assert model.model.layers[0].self_attn.num_key_value_groups == 1
    model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_inplace_uniform_ratio_updates_config_and_reloads(cls_name, tmp_path):
    torch.manual_seed(0)
    model = tiny_decoder(cls_name)
    ids = token_ids(1, 6)
    fxprune.prune(model, 0.5, example_inputs=(ids,), inplace=True)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (32, 64, 1, 1, 16)
    assert model.model.layers[1].mlp.down_proj.in_features == 64
    with torch.no_grad():
        logits = model(ids).logits
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_inplace_non_uniform_reloads_with_load_pretrained(cls_name, tmp_path):
    torch.manual_seed(0)
    model = tiny_decoder(cls_name)
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    kv0 = dg.groups_of("model.layers.0.self_attn.k_proj.weight", 0)[0]
    mlp1 = dg.group_of("model.layers.1.mlp.up_proj.weight", 0)
    removal = plant_dead_units(dg, groups=[kv0, mlp1], fraction=0.5)
    with torch.no_grad():
        logits = model(ids).logits
    fxprune.apply(dg, removal, inplace=True)
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    assert model.model.layers[1].self_attn.k_proj.out_features == 32
    assert model.config.fxprune_shapes["model.layers.1.mlp.up_proj.weight"] == [64, 64]
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=0)
        reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_inplace_failure_puts_the_original_model_back(monkeypatch):
    torch.manual_seed(0)
    model = tiny_decoder("LlamaForCausalLM")
    ids = token_ids(1, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config, attention = model.config.to_dict(), vars(model.model.layers[0].self_attn).copy()
    with torch.no_grad():
        logits = model(ids).logits

    def broken(*args, **kwargs):
        raise fxprune.FxPruneError("the model pruned in place no longer runs: simulated")

    monkeypatch.setattr(fxprune.huggingface.inplace, "generates", broken)
    with pytest.raises(fxprune.FxPruneError, match="simulated"):
        fxprune.prune(model, 0.5, example_inputs=(ids,), inplace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == config
    assert {k: v for k, v in vars(model.model.layers[0].self_attn).items() if isinstance(v, int)} == \
        {k: v for k, v in attention.items() if isinstance(v, int)}
    with torch.no_grad():
        assert_same_outputs(model(ids).logits, logits)  # the restored tensors are bit-equal (above)


def test_gpt2_fused_qkv_in_place_generates_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    frozen = [g for g in dg.groups if any("head dim of transformer.h.0.attn" in r for r in g.frozen)]
    assert [g.units for g in frozen] == [16, 16]  # q|k and v head dims of the fused c_attn
    removal = plant_dead_units(dg)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fxprune.apply(dg, removal, inplace=True)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)
    # then 0.3 more: a hidden size that is not heads x 16, which GPT2Config cannot describe
    fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True)
    attn = model.transformer.h[0].attn
    assert attn.head_dim == 16 and attn.split_size == attn.num_heads * 16 == attn.c_attn.weight.shape[1] // 3
    assert model.config.fxprune_shapes and model.config.fxprune_attributes  # read back by load_pretrained
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def _vision(name):
    T = transformers
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=3, **TINY))
    if name == "swin":
        return T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                         num_heads=[2, 4], window_size=4, num_labels=3))
    return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                             num_labels=3))


@pytest.mark.parametrize("name", ["vit", "swin", "convnext"])
def test_vision_models_in_place_dead_units_exact_and_reload(name, tmp_path):
    torch.manual_seed(0)
    model, x = _vision(name).eval(), torch.randn(2, 3, 32, 32)
    dg = fxprune.analyze(model, (x,), inplace=True)
    removal = plant_dead_units(dg, seed=1)
    with torch.no_grad():
        before = model(x).logits
    assert fxprune.apply(dg, removal, inplace=True) is model
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _vision(name).parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)
    if name == "vit":  # the hidden size is found from the groups (its patch embedding is a conv, not a token table)
        hidden = dg.group_of("vit.embeddings.patch_embeddings.projection.weight", 0)
        assert model.config.hidden_size == 64 - len(removal.get(hidden, ()))
    model.save_pretrained(tmp_path)  # Swin: under transformers 5's older checkpoint names, mapped back on loading
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before, atol=1e-5, rtol=0)


def test_inplace_unexpected_error_is_an_fxprune_error_and_the_model_is_put_back(monkeypatch):
    model, x = _vision("vit").eval(), torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args, **kwargs):
        raise AttributeError("simulated")

    monkeypatch.setattr(fxprune.huggingface.inplace, "update_config", broken)
    with pytest.raises(fxprune.FxPruneError, match="in place failed .* AttributeError: simulated"):
        fxprune.prune(model, 0.5, example_inputs=(x,), inplace=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _in_place_family(name):
    """(model, kwargs) of tiny families whose in-place pruning needs more than attribute names: fused q|k|v
    projections under other names, config fields derived from the hidden size, tied inner embeddings, and
    non-persistent buffers computed from the config."""
    T = transformers
    decoder = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=64)
    if name == "gpt_neox":  # query_key_value, viewed as (heads, q|k|v of one head)
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**decoder)), {}
    if name == "phi3":  # qkv_proj, sliced q | k | v at widths read from the config in forward
        return T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **decoder)), {}
    if name == "opt":  # word_embed_proj_dim == hidden_size, else project_in / project_out
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64,
                                            pad_token_id=1)), {}
    if name == "bart":  # encoder / decoder embed_tokens tied to shared, declared on the inner BartModel
        config = T.BartConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                              max_position_embeddings=64)
        return T.BartForConditionalGeneration(config), {"decoder_input_ids": token_ids(1, 4, seed=1)}
    if name == "marian":  # sinusoidal position tables: parameters that save_pretrained leaves out
        config = T.MarianConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=128,
                                decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                                max_position_embeddings=64, decoder_start_token_id=0, pad_token_id=1)
        return T.MarianMTModel(config), {"decoder_input_ids": token_ids(1, 4, seed=1)}
    if name == "olmo":  # a LayerNorm without weights: its normalized_shape attribute restates the hidden size
        return T.OlmoForCausalLM(T.OlmoConfig(pad_token_id=0, eos_token_id=1, **decoder)), {}
    if name == "xglm":  # embed_dim attributes; sinusoidal positions in a buffer rebuilt from embedding_dim
        return T.XGLMForCausalLM(T.XGLMConfig(vocab_size=100, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                                              max_position_embeddings=64)), {}
    if name == "falcon":  # head_dim is a read-only property of the config; rotary inv_freq from hidden / heads
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_kv_heads=2,
                                                  new_decoder_architecture=True)), {}
    gemma = dict(num_key_value_heads=2, head_dim=16, **decoder)  # embed_scale: sqrt(hidden_size), not saved
    if name == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**gemma)), {}
    if name == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**gemma)), {}
    if not hasattr(T, "Gemma3ForCausalLM"):
        pytest.skip(f"transformers {T.__version__} has no Gemma-3")
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**gemma)), {}


def _prune_save_reload(name, tmp_path):
    """Prune a tiny ``name`` by 0.3 in place; returns (original, pruned model, reloaded, ids, kwargs)."""
    torch.manual_seed(0)
    model, kwargs = _in_place_family(name)
    model.eval()
    original = copy.deepcopy(model)
    ids = token_ids(1, 6)
    assert fxprune.prune(model, 0.3, example_inputs=(ids,), kwargs=kwargs, inplace=True) is model
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert_same_outputs(reloaded(ids, **kwargs).logits, model(ids, **kwargs).logits)
    return original, model, reloaded, ids, kwargs


def _attention(model):
    return next(m for name, m in model.named_modules() if name.endswith("layers.0.attention")
                or name.endswith("layers.0.self_attn"))


@pytest.mark.parametrize("name", ["gpt_neox", "phi3"])
def test_fused_qkv_under_other_names_in_place_prunes_heads_generates_and_reloads(name, tmp_path):
    original, model, reloaded, ids, _ = _prune_save_reload(name, tmp_path)
    # heads and MLP units are pruned, head dims are kept whole (one head_size / head_dim attribute)
    assert model.config.num_attention_heads < 4 and model.config.intermediate_size < 128
    fused = next(c for c in _attention(model).children() if c.out_features > c.in_features)
    assert fused.out_features % 16 == 0 and fused.out_features < next(
        c for c in _attention(original).children() if c.out_features > c.in_features).out_features
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)
    heads = fxprune.analysis.attention_sites.attention_sites(fxprune.analyze(model, (ids,), inplace=True).gm)
    assert {s.heads for s in heads.values()} == {model.config.num_attention_heads}
    # head dims stay whole in place even when asked to prune them; heads stay prunable
    dg = fxprune.analyze(original, (ids,), inplace=True, prune_head_dims=True)
    attention = [g for g in dg.groups if any(".layers.0." in m.name and m.dim == 0 and m.name.split(".")[-2] in
                                             ("query_key_value", "qkv_proj") for m in g.members)]
    frozen = [g for g in attention if any("head dim of" in r for r in g.frozen)]
    assert frozen and sum(g.units for g in frozen if not g.prunable) >= 16
    assert [g.units for g in attention if g.prunable] and all(g.units <= 4 for g in attention if g.prunable)  # heads


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="the stale model divides by zero inside a kernel on torch < 2.8 (SIGFPE kills the process)")
def test_stale_head_count_is_caught_by_comparing_with_the_pruned_graph(monkeypatch):
    """Phi-3 with its kv head count left stale still runs (on empty slices): only the outputs tell."""
    torch.manual_seed(0)
    model, _ = _in_place_family("phi3")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(fxprune.huggingface.inplace, "update_head_counts", lambda *args: None)
    monkeypatch.setattr(fxprune.rewriting.inplace.mechanism, "decide_head_counts", lambda *args: set())
    with pytest.raises(fxprune.FxPruneError, match="in place"):
        fxprune.prune(model, 0.3, example_inputs=(token_ids(1, 6),), inplace=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["opt", "bart", "marian", "falcon", "gemma", "gemma2", "gemma3", "olmo", "xglm"])
def test_in_place_reload_is_identical(name, tmp_path):
    if name.startswith("gemma"):
        model, _ = _in_place_family(name)
        if not hasattr(model.get_input_embeddings(), "embed_scale"):
            # older transformers scale by sqrt(config.hidden_size) in forward: with the hidden size pruned the
            # written-back model computes something else than the pruned graph, which must be an error (and the
            # model put back), never a silently different model
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(fxprune.FxPruneError, match="computes something else"):
                fxprune.prune(model.eval(), 0.3, example_inputs=(token_ids(1, 6),), inplace=True)
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
            return
    original, model, reloaded, ids, kwargs = _prune_save_reload(name, tmp_path)
    width = model.get_input_embeddings().weight.shape[1]
    # BART and Marian take inputs_embeds[:, :, -1] for its shape only, and return the encoder's states: the hidden
    # size is pruned all the same
    assert width < 64 and model.config.hidden_size == width
    if name in ("bart", "marian"):
        assert model.model.encoder.layers[0].fc1.out_features < 128
        assert reloaded.model.encoder.embed_tokens.weight is reloaded.model.shared.weight or name == "marian"
        with torch.no_grad():  # the encoder's states are returned at the pruned width
            assert model(ids, **kwargs).encoder_last_hidden_state.shape[-1] == width
    if name == "marian":  # sinusoidal positions, not saved: the kept columns of the original table, not a new one
        kept = reloaded.model.encoder.embed_positions.weight
        assert kept.shape == (64, width) and torch.equal(kept, model.model.encoder.embed_positions.weight)
        assert set(model.config.fxprune_buffers) >= {"model.encoder.embed_positions.weight"}
    if name == "falcon":  # (kv groups, q heads per group + k + v), k and v broadcast to the group: heads pruned
        assert model.config.num_attention_heads < 4
        kv = model.transformer.h[0].self_attention.num_kv_heads
        assert model.config.num_kv_heads == kv and not any("num_kv_heads" in k for k in
                                                           getattr(model.config, "fxprune_attributes", {}))
    if name == "opt":  # a rebuild with word_embed_proj_dim != hidden_size would add project_in / project_out
        assert model.config.word_embed_proj_dim == width and model.config.ffn_dim < 128
        assert not any("project_" in n for n, _ in reloaded.named_parameters())
    if name in ("olmo", "xglm"):  # attributes that restate the hidden size follow it; generate as the reload does
        norms = [m for m in model.modules() if hasattr(m, "normalized_shape")]
        assert norms and all(tuple(m.normalized_shape) == (width,) for m in norms)
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)
    if name.startswith("gemma"):  # sqrt of the ORIGINAL hidden size, not of the pruned one
        assert model.config.fxprune_buffers["model.embed_tokens.embed_scale"] == pytest.approx(8.0)
        assert reloaded.model.embed_tokens.embed_scale.item() == pytest.approx(8.0)
        assert model.config.intermediate_size < 128
    with torch.no_grad():  # and the pruned model still computes what the pruned graph computes
        assert_same_outputs(reloaded(ids, **kwargs).logits, model(ids, **kwargs).logits)


def test_gpt_neox_heads_pruned_in_one_layer_only_reload_with_load_pretrained(tmp_path):
    """Per-layer head counts the config cannot hold: GPT-NeoX views its fused projection by head size, so only
    the record of shapes and attributes (head_size, rotary dims) lets a rebuild load it."""
    torch.manual_seed(0)
    model, _ = _in_place_family("gpt_neox")
    model.eval()
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    heads = next(g for g in dg.groups_of("gpt_neox.layers.0.attention.query_key_value.weight", 0) if g.prunable)
    removal = plant_dead_units(dg, groups=[heads], fraction=0.5)
    with torch.no_grad():
        logits = model(ids).logits
    fxprune.apply(dg, removal, inplace=True)
    assert model.gpt_neox.layers[0].attention.query_key_value.out_features == 2 * 48
    assert model.gpt_neox.layers[1].attention.query_key_value.out_features == 4 * 48
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)  # dead heads: the same function
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)


def test_xglm_hidden_size_alone_pruned_in_place_keeps_the_reshape_width(tmp_path):
    """XGLM reshapes its attention output by ``self.embed_dim``, the query width: with the hidden size alone
    pruned it is no longer the hidden size, which the rewritten graph's reshape shows (and a rebuild from the
    config gets wrong: recorded for ``load_pretrained``)."""
    torch.manual_seed(0)
    model, _ = _in_place_family("xglm")
    model.eval()
    ids = token_ids(1, 6)
    dg = fxprune.analyze(model, (ids,), inplace=True)
    hidden = dg.group_of("model.embed_tokens.weight", 1)
    fxprune.apply(dg, {hidden: list(range(0, 64, 4))}, inplace=True)
    attention = model.model.layers[0].self_attn
    assert model.config.d_model == 48 and attention.q_proj.weight.shape == (64, 48) and attention.embed_dim == 64
    model.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    assert reloaded.model.layers[0].self_attn.embed_dim == 64
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="the model with uneven head counts divides by zero inside torch < 2.8's attention kernel "
                           "(SIGFPE kills the process before fxprune can put it back)")
def test_phi3_heads_pruned_in_one_layer_only_is_a_clear_error_and_the_model_is_put_back():
    """Phi-3 slices its fused q|k|v at ``config.num_attention_heads * head_dim`` in forward: one count for every
    layer, so per-layer head counts cannot be written back in place. The error says so; nothing changes."""
    torch.manual_seed(0)
    model, _ = _in_place_family("phi3")
    model.eval()
    dg = fxprune.analyze(model, (token_ids(1, 6),), inplace=True)
    heads = next(g for g in dg.groups_of("model.layers.0.self_attn.qkv_proj.weight", 0) if g.prunable)
    removal = plant_dead_units(dg, groups=[heads], fraction=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxprune.FxPruneError, match="different head counts .*layers.0.self_attn: 2 heads"):
        fxprune.apply(dg, removal, inplace=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.config.num_attention_heads == 4 and not hasattr(model.config, "fxprune_shapes")


def test_wav2vec2_in_place_updates_group_norm_groups_and_weight_norm_conv_groups(tmp_path):
    """Wav2Vec2's feature encoder normalises each channel (GroupNorm(C, C)) and its positional convolution is
    grouped under a weight-norm parametrization: in place, both counts follow the pruned channels (from the
    graph), else the model pruned in place no longer runs."""
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=128, conv_dim=[32, 32], conv_kernel=[10, 3],
                                         conv_stride=[5, 2], num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    audio = torch.randn(2, 480, generator=torch.Generator().manual_seed(0))
    fxprune.prune(model, 0.3, example_inputs=(audio,), inplace=True)
    norm = model.wav2vec2.feature_extractor.conv_layers[0].layer_norm
    assert norm.num_groups == norm.num_channels == norm.weight.shape[0] < 32
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    assert conv.in_channels == conv.groups * conv.weight.shape[1] == model.config.hidden_size
    with torch.no_grad():
        logits = model(audio).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert_same_outputs(fxprune.load_pretrained(str(tmp_path))(audio).logits, logits)


def test_olmo_weightless_norms_follow_the_hidden_size_when_a_query_width_of_the_same_size_shrinks_further(tmp_path):
    """OLMo's LayerNorms have no weight: their ``normalized_shape`` restates the hidden size. With 4 heads of 16
    over 2 kv heads, ratio 0.3 leaves one head (query width 64 -> 16) and a hidden size of 48 (64 -> 48): the
    original size 64 became two sizes, and the norms must take the hidden size's."""
    torch.manual_seed(0)
    config = transformers.OlmoConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                     pad_token_id=0, eos_token_id=1)
    model = transformers.OlmoForCausalLM(config).eval()
    ids = token_ids(2, 7)
    fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True)
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] != model.config.hidden_size
    assert model.model.norm.normalized_shape == (model.config.hidden_size,) and model.config.hidden_size < 64
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert_same_outputs(fxprune.load_pretrained(str(tmp_path))(ids).logits, logits)


@pytest.mark.parametrize("name", ["codegen", "t5"])
def test_attributes_a_rebuild_would_change_stay_where_the_model_needs_its_own(name, tmp_path):
    """A rebuild from the pruned config gives CodeGen's attention ``embed_dim`` and T5's attention widths the new
    hidden size, but their forward needs the values they had: following the rebuild made the model compute
    something else (an error). The guess is taken back when the output check fails, and recorded for reload."""
    T = transformers
    torch.manual_seed(0)
    if name == "codegen":
        model = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                     n_positions=64, n_ctx=64, n_inner=256))
        kwargs = {}
    else:
        model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                                        num_heads=4, decoder_start_token_id=0))
        kwargs = {"decoder_input_ids": token_ids(2, 4, seed=1)}
    model.eval()
    ids = token_ids(2, 7)
    before = sum(p.numel() for p in model.parameters())
    fxprune.prune(model, 0.3, example_inputs=(ids,), kwargs=kwargs or None, inplace=True)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    with torch.no_grad():
        logits = model(ids, **kwargs).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert_same_outputs(fxprune.load_pretrained(str(tmp_path))(ids, **kwargs).logits, logits)


def test_a_head_count_equal_to_a_kept_size_of_the_same_module_is_taken_back_where_the_check_shows_it(tmp_path):
    """StableLM's attention keeps ``rotary_ndims`` (head_dim 16 x partial_rotary_factor 0.25 = 4), equal to its 4
    heads: its ops slice ``x[..., :4]`` (kept) and view 4 heads (pruned), so 4 goes to both. The attribute is set
    with the head counts, the output check fails, and that group (one attribute in every layer) goes back: the
    model is pruned, not restored."""
    torch.manual_seed(0)
    config = transformers.StableLmConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.rope_parameters["partial_rotary_factor"] = 0.25
    model = transformers.StableLmForCausalLM(config).eval()
    ids = token_ids(1, 7)
    assert model.model.layers[0].self_attn.rotary_ndims == 4 == config.num_attention_heads
    fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape[0] < 64 and attn.rotary_ndims == 4
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert_same_outputs(fxprune.load_pretrained(str(tmp_path))(ids).logits, logits)
