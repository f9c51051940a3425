"""Defaults that keep pruned models fast: aligned widths, whole heads (issue 9).

Every weight dimension that was a multiple of the alignment stays one; ``round_to``
sets the alignment in channels and ``round_to=1`` turns it off; attention's
per-head widths stay whole unless ``prune_head_dims=True``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
import transformers

import fxprune
from fxprune.planning.alignment import default_alignment

LLAMA = dict(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=64)


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def misaligned(original, pruned, alignment: int) -> list[str]:
    """Parameter dimensions that were multiples of ``alignment`` and no longer are."""
    before = dict(original.named_parameters())
    bad = []
    for name, p in pruned.named_parameters():
        old = before.get(name)
        if old is None:
            continue
        for d, (a, b) in enumerate(zip(old.shape, p.shape)):
            if a % alignment == 0 and b % alignment:
                bad.append(f"{name}[{d}]: {a} -> {b}")
    return bad


def changed(original, pruned) -> int:
    before = dict(original.named_parameters())
    return sum(p.shape != before[n].shape for n, p in pruned.named_parameters() if n in before)


CASES = {
    "resnet50": (lambda: torchvision.models.resnet50().eval(), lambda: (torch.randn(1, 3, 64, 64),)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32).eval(), lambda: (torch.randn(1, 3, 32, 32),)),
    "llama": (llama, lambda: (torch.randint(0, 128, (2, 8)),)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_default_widths_stay_multiples_of_the_alignment(name, ratio):
    make, inputs = CASES[name]
    model = make()
    alignment = default_alignment(model)
    assert alignment == 8
    pruned = fxprune.prune(model, ratio, example_inputs=inputs())
    assert changed(model, pruned) > 0
    assert misaligned(model, pruned, alignment) == []


def test_round_to_is_channels_and_one_turns_alignment_off():
    model, x = llama(), (torch.randint(0, 128, (2, 8)),)
    exact = fxprune.prune(model, 0.3, example_inputs=x, round_to=1)
    rows = lambda m, name: m.get_submodule(name).weight.shape[0]  # noqa: E731 (exported graphs hold plain modules)
    assert rows(exact, "model.layers.0.mlp.up_proj") == 768 - round(0.3 * 768)  # 538
    assert misaligned(model, exact, 8)
    eight = fxprune.prune(model, 0.3, example_inputs=x, round_to=8)
    assert misaligned(model, eight, 8) == []
    # a kv head is 32 channels wide: heads are not rounded to 8 units (4 kv heads lose one, not none)
    assert rows(eight, "model.layers.0.self_attn.k_proj") == 3 * 32


def test_head_dims_are_kept_by_default_and_pruned_on_request():
    model, x = llama(), (torch.randint(0, 128, (2, 8)),)
    dg = fxprune.analyze(model, x)
    rope = dg.groups_of("model.layers.0.self_attn.q_proj.weight", 0)[-1]
    assert rope.units == 16 and not rope.prunable and "head dim of attention" in rope.frozen[0]
    pruned = fxprune.prune(model, 0.5, example_inputs=x)
    for i in range(2):
        q, k = (pruned.get_submodule(f"model.layers.{i}.self_attn.{p}_proj").weight.shape[0] for p in "qk")
        assert q % 32 == 0 and k % 32 == 0 and k < 4 * 32
    assert pruned.model.rotary_emb.inv_freq.shape == model.model.rotary_emb.inv_freq.shape
    narrow = fxprune.prune(model, 0.5, example_inputs=x, prune_head_dims=True, round_to=1)
    assert narrow.model.rotary_emb.inv_freq.shape[0] < 16


def test_attention_written_as_matmuls_keeps_its_head_width():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(2, 5, 32))

    dg = fxprune.analyze(Attention(), (torch.randn(2, 5, 32),))
    widths = [g for g in dg.groups if g.head_dim]
    assert widths and all(not g.prunable for g in widths)
    heads = [g for g in dg.prunable_groups if g.units == 4]
    assert heads, dg.report()


def test_every_dtype_and_device_aligns_to_eight():  # measured: benchmarks/alignment_cpu.md
    assert default_alignment(torch.nn.Linear(4, 4).half()) == 8
    assert default_alignment(torch.nn.Linear(4, 4, device="meta")) == 8
    assert default_alignment(torch.nn.Linear(4, 4)) == 8
