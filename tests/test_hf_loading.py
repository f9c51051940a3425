"""``fxprune.load_pretrained``: memory (never the full-size model) and dtype (the saved one, or the caller's).

``load_pretrained`` allocates nothing but the loaded weights while building (checked by an aten dispatch counter)
and keeps bfloat16 or the caller's dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxprune
from fxprune.testing import assert_same_outputs, tiny_llama

transformers = pytest.importorskip("transformers")


class _AllocatedBytes(TorchDispatchMode):
    """Bytes of every new storage an aten op returns off the meta device (views and in-place ops add nothing)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:  # freed addresses are reused: only inputs tell a view
                    inputs.add(storage.data_ptr())
                    self.total += storage.nbytes()
        return out


def _pruned_llama(tmp_path, dtype=torch.float32):
    """A LLaMA pruned in place to ~10% of its parameters, with per-layer MLP widths (so ``config.fxprune_shapes``
    is needed), saved to ``tmp_path``; returns (model, ids, the original's parameter bytes)."""
    model = tiny_llama(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2).to(dtype)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    fxprune.prune(model, 0.6, example_inputs=(ids,), inplace=True, ratios={model.model.layers[1].mlp: 0.8})
    assert model.config.fxprune_shapes  # load_pretrained's own path, not a plain from_pretrained
    model.save_pretrained(tmp_path)
    return model, ids, full


def test_load_pretrained_never_builds_the_full_size_model(tmp_path):
    model, ids, full = _pruned_llama(tmp_path)
    pruned = sum(p.numel() * p.element_size() for p in model.parameters())
    assert pruned < 0.15 * full
    with _AllocatedBytes() as counter:
        reloaded = fxprune.load_pretrained(str(tmp_path))
    # built on the meta device: nothing is allocated but the loaded weights, which safetensors maps from the file
    # outside the dispatcher (a model built for real and then loaded allocates at least the pruned model's bytes)
    assert counter.total < 0.1 * pruned, (counter.total, pruned)
    assert not any(t.device.type == "meta" for t in reloaded.state_dict().values())
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits, model(ids).logits)
        # rotary inv_freq is not saved: recomputed as a model built from the config computes it
        torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
        reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_load_pretrained_keeps_the_saved_dtype_or_the_callers(tmp_path):
    model, ids, _ = _pruned_llama(tmp_path, dtype=torch.bfloat16)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert_same_outputs(reloaded(ids).logits.float(), model(ids).logits.float())
    as_float = fxprune.load_pretrained(str(tmp_path), dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    assert fxprune.load_pretrained(str(tmp_path), torch_dtype=torch.float32).lm_head.weight.dtype == torch.float32
