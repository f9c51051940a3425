"""Models dispatched by accelerate (``device_map=...``): pruned as they are, or refused clearly when offloaded.

A model dispatched by accelerate (hooks on every block) prunes in place with calibration and reloads; an offloaded
one is a ``CaptureError`` pointing to ``prune_checkpoint``.
"""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import CaptureError
from fxprune.testing import assert_same_outputs, tiny_llama

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")


def device_map(model, offload: str | None = None) -> dict:
    """Every top-level block on the CPU, the last decoder layer on ``offload`` when given."""
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    placed = {name: "cpu" for name in names + layers}
    if offload:
        placed[layers[-1]] = offload
    return placed


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="torch.export < 2.8 cannot capture a forward that accelerate replaced by a functools.partial "
                           "(a clear CaptureError)")
def test_a_dispatched_model_prunes_in_place_with_calibration_and_reloads(tmp_path):
    model = tiny_llama(num_hidden_layers=2)
    model = accelerate.dispatch_model(model, device_map=device_map(model), force_hooks=True)  # accelerate's hooks on every block, as on several GPUs
    assert hasattr(model.model.layers[1], "_hf_hook")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(1, 5)]
    fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True, calibration=batches, importance="activation",
                  reconstruct=True)
    assert model.model.layers[1].mlp.up_proj.weight.shape[0] < 64
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert_same_outputs(fxprune.load_pretrained(tmp_path)(ids).logits, logits)


def test_an_offloaded_model_is_refused_with_the_way_out(tmp_path):
    import transformers

    original = tiny_llama(num_hidden_layers=2)
    original.save_pretrained(tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "src", device_map=device_map(original, offload="disk"),
        offload_folder=str(tmp_path / "offload"))
    with pytest.raises(CaptureError, match="offloaded by accelerate.*prune_checkpoint"):
        fxprune.prune(model, 0.25, example_inputs=(torch.randint(0, 100, (1, 8)),), inplace=True)
