"""Tiny Hugging Face models and inputs shared by the tests/test_hf_*.py files (random weights, built offline).

Example::

    >>> model, args, kwargs = family("llama")      # LlamaForCausalLM over DECODER, ids of (2, 7)
    >>> model = tiny_decoder("Qwen2ForCausalLM")   # DECODER sizes, eval mode
"""

from __future__ import annotations

import pytest
import torch
import transformers

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
DECODER = dict(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, **TINY)


def token_ids(batch=2, length=7, seed=0):
    """Random token ids below 100, of shape (batch, length), the same for the same seed."""
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def family(name):
    """(model, args, kwargs) of a tiny random-init model of each family."""
    T = transformers
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=100, **TINY)), (token_ids(),), {}
    if name == "vit":
        return T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **TINY)), (torch.randn(2, 3, 32, 32),), {}
    if name == "gpt2":
        config = T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                              eos_token_id=0)
        return T.GPT2LMHeadModel(config), (token_ids(),), {}
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**DECODER)), (token_ids(),), {}
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)), (token_ids(),), {}
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**DECODER)), (token_ids(),), {}
    if name == "t5":
        config = T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        return T.T5ForConditionalGeneration(config), (token_ids(),), {"decoder_input_ids": token_ids(2, 5, seed=1)}
    if name == "deberta_v2":  # relative attention through aten.bmm (self, mat2)
        return T.DebertaV2Model(T.DebertaV2Config(vocab_size=100, **TINY)), (token_ids(),), {}
    if name == "bloom":  # ALiBi scores through aten.baddbmm (self, batch1, batch2)
        return T.BloomModel(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)), (token_ids(),), {}
    if name == "marian":  # sinusoidal position tables: parameters that save_pretrained leaves out
        config = T.MarianConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=128,
                                decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                                max_position_embeddings=64, decoder_start_token_id=0, pad_token_id=1)
        return T.MarianMTModel(config), {"decoder_input_ids": token_ids(1, 4, seed=1)}
    if name == "falcon":  # projections as input @ self.weight.T: aten.numpy_T
        config = T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_kv_heads=2, new_decoder_architecture=False)
        return T.FalconForCausalLM(config), (token_ids(),), {}
    raise KeyError(name)


def other_sizes(name, args, kwargs):
    """Inputs of another batch size and sequence length than ``family``'s."""
    if name == "vit":
        return (torch.randn(3, 3, 32, 32),), {}
    return (token_ids(3, 5, seed=2),), {k: token_ids(3, 4, seed=3) for k in kwargs}


FAMILIES = ["bert", "vit", "gpt2", "llama", "qwen2", "mistral", "t5", "deberta_v2", "bloom"]


def alibi_or_multi_query(name):
    """A tiny causal LM whose attention heads meet ALiBi slopes (``arange`` over the heads) or one key/value head
    shared by the query heads (a constant ``[-2]`` index, ``broadcast_to``); ``use_cache=False``."""
    T = transformers
    falcon = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_cache=False)
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4, use_cache=False))
    if name == "falcon_multi_query":  # q heads, then one k and one v head in one fused projection
        return T.FalconForCausalLM(T.FalconConfig(multi_query=True, new_decoder_architecture=False, **falcon))
    if name.startswith("falcon_kv"):  # (kv groups, q heads per group + k + v): k and v broadcast to the group
        return T.FalconForCausalLM(T.FalconConfig(new_decoder_architecture=True, num_kv_heads=int(name[-1]), **falcon))
    if name == "falcon_alibi":
        return T.FalconForCausalLM(T.FalconConfig(multi_query=True, alibi=True, new_decoder_architecture=False,
                                                  **falcon))
    if name == "mpt":
        if not hasattr(T, "MptForCausalLM"):
            pytest.skip(f"transformers {T.__version__} has no MPT")
        return T.MptForCausalLM(T.MptConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                                            use_cache=False))
    raise KeyError(name)


def tiny_decoder(cls_name):
    """A causal LM class of transformers by name (``"LlamaForCausalLM"``) over :data:`DECODER`, in eval mode."""
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    return getattr(transformers, cls_name)(config_cls(**DECODER)).eval()


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a cat dog sat on mat ran far away and is was big small red green blue house tree").split()


def tiny_tokenizer(folder):
    """A real ``BertTokenizerFast`` over :data:`WORDS`, built offline from a vocab file written in ``folder``.

    Example::

        >>> tokenizer = tiny_tokenizer(tmp_path)
        >>> tokenizer("the red cat", return_tensors="pt")["input_ids"].tolist()    # [CLS] the red cat [SEP]
        [[2, 5, 20, 7, 3]]
    """
    path = folder / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab=str(path))
    assert tokenizer.convert_tokens_to_ids("cat") == WORDS.index("cat"), "the tokenizer did not read the vocab file"
    return tokenizer
