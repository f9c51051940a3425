"""fxprune.save / fxprune.load: identical outputs after a round trip, and no pickle anywhere."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
import fxprune.testing
from fxprune.analysis.capture import export_capture
from fxprune.io.jsonvalue import SerializationError, decode, encode
from fxprune.testing import assert_same_outputs
from tests import models

MODELS = {  # name: (factory, example input shape)
    "WorkedExample": (models.WorkedExample, (2, 3, 4, 4)),
    "ResidualCNN": (models.ResidualCNN, (2, 3, 8, 8)),
    "DenseBlock": (models.DenseBlock, (2, 3, 8, 8)),
    "C2f": (models.C2f, (2, 3, 8, 8)),
    "ChannelShuffle": (models.ChannelShuffle, (2, 3, 8, 8)),
    "GroupedConv": (models.GroupedConv, (2, 3, 8, 8)),
    "FlattenLinear": (models.FlattenLinear, (2, 3, 8, 8)),
    "HardCodedDecoder": (models.HardCodedDecoder, (2, 16)),
    "ViTBlock": (models.ViTBlock, (2, 5, 12)),
    "LSTMHead": (models.LSTMHead, (2, 5, 6)),
    "MHAModel": (models.MHAModel, (2, 5, 10)),
}
# captured, not pruned (the serializer does not care, and analysis would dominate the run time); resnet18 is
# pruned below; swin_t brings torch.fx.wrap'ed functions, mobilenet_v3 hardswish/SE, squeezenet concatenation
TORCHVISION = {"mobilenet_v3_small": {}, "squeezenet1_0": {}, "swin_t": {}}


def load_without_pickle(directory):
    """fxprune.load with torch.load and pickle's loaders made to raise while it runs."""
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used")

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            patch.setattr(owner, name, forbidden)
        return fxprune.load(directory)


def round_trip(gm, directory, inputs):
    fxprune.save(gm, directory)
    assert {p.name for p in directory.iterdir()} <= {"code.py", "model.json", "plan.json", "weights.safetensors"}
    loaded = load_without_pickle(directory)
    with torch.no_grad():
        expected, got = gm(*inputs), loaded(*inputs)
    assert_same_outputs(got, expected)  # mobilenet_v3_small's outputs of 1e-10 differed in the last bits on AMD
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters() if p.numel())  # aligned as fresh tensors
    assert loaded.code == gm.code
    assert list(loaded.state_dict()) == list(gm.state_dict())
    assert [type(m).__name__ for _, m in loaded.named_modules()][1:] == \
        [type(m).__name__ for _, m in gm.named_modules()][1:]
    return loaded


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_test_models_round_trip_without_pickle(name, tmp_path):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    pruned = fxprune.prune(factory().eval(), 0.5, example_inputs=(x,))
    loaded = round_trip(pruned, tmp_path, (x,))
    assert isinstance(loaded.meta["fxprune_plan"], fxprune.PruningPlan)  # plan.json comes back with the model


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_graphs_round_trip(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **TORCHVISION[name]).eval()
    gm, x = fxprune.capture(model), (torch.randn(1, 3, 64, 64),)
    loaded = round_trip(gm, tmp_path, x)
    with torch.no_grad():  # the tolerance, relative to outputs of 1e-10, still catches one wrong weight
        name, weight = [(n, p) for n, p in loaded.named_parameters() if p.ndim > 1][-1]
        weight[0] *= 1.01
        with pytest.raises(AssertionError, match="output leaf 0"):
            assert_same_outputs(loaded(*x), gm(*x))


def test_pruned_resnet18_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.prune(torchvision.models.resnet18().eval(), 0.5, example_inputs=(x,))
    round_trip(pruned, tmp_path, (x,))


def test_pruned_vit_round_trip(tmp_path):
    """Its attention is a PrunedMultiheadAttention (fewer heads than the residual width holds)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.prune(torchvision.models.vit_b_16(image_size=32).eval(), 0.5, example_inputs=(x,))
    assert isinstance(pruned.encoder.layers.encoder_layer_0.self_attention, nn.MultiheadAttention)
    round_trip(pruned, tmp_path, (x,))


def test_exported_graph_round_trip(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    gm = export_capture(models.ResidualCNN().eval(), (x,))
    pruned = fxprune.prune(gm, 0.5, example_inputs=(x,))
    loaded = round_trip(pruned, tmp_path, (x,))
    assert loaded.meta["fxprune_capture"] == "export"


def test_hugging_face_exported_graph_round_trip(tmp_path):
    pytest.importorskip("transformers")
    model = fxprune.testing.tiny_llama(vocab_size=50)
    ids = torch.randint(0, 50, (1, 6))
    gm = fxprune.capture(model, (ids,))
    round_trip(gm, tmp_path, (ids,))


def test_torch_save_of_a_pruned_hugging_face_model_loads_back_with_its_output_class(tmp_path):
    """torch pickles a GraphModule as its code, traced again on load: an exported graph's tracer class could not be
    built there (torch.load failed on what torch.save wrote) and its ModelOutput came back a dict. The pruned graph
    (and a copy of it) pickles through fxprune.save instead: same class, outputs, plan; other batch sizes run."""
    pytest.importorskip("transformers")
    import copy

    model = fxprune.testing.tiny_llama(vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, 6))
    pruned = fxprune.prune(model, 0.5, example_inputs=(ids,))
    for i, module in enumerate((pruned, copy.deepcopy(pruned))):
        torch.save(module, tmp_path / f"pruned{i}.pt")
        loaded = torch.load(tmp_path / f"pruned{i}.pt", weights_only=False)
        assert type(loaded(ids)) is type(pruned(ids)) and type(pruned(ids)) is not dict
        assert_same_outputs(loaded(ids), pruned(ids))
        more = torch.randint(0, 50, (3, 9))
        assert_same_outputs(loaded(more), pruned(more))
        assert fxprune.plan_of(loaded).groups == fxprune.plan_of(pruned).groups
    traced = fxprune.prune(models.ResidualCNN().eval(), 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert not isinstance(traced, fxprune.io.serialize.PickledThroughSave)  # torch's own pickling works there


def test_a_saved_hugging_face_graph_loads_in_a_fresh_process_that_never_imported_its_output_class(tmp_path):
    """A user's loading script imports fxprune and loads: transformers imports its ModelOutput classes lazily, so
    the output's pytree type (BertModel's BaseModelOutputWithPoolingAndCrossAttentions) was not registered there
    and loading failed ("Deserializing ... in pytree is not registered"); the module the file names is imported."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    from tests.hf_models import family, token_ids

    model, (ids,), _ = family("bert")
    pruned = fxprune.prune(model.eval(), 0.5, example_inputs=(ids[:1],))
    fxprune.save(pruned, tmp_path / "bert")
    torch.save(pruned(ids).last_hidden_state, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch, fxprune
assert "transformers.modeling_outputs" not in sys.modules
loaded = fxprune.load({str(tmp_path / "bert")!r})
out = loaded(torch.load({str(tmp_path / "ids.pt")!r}))
assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions", type(out)
torch.testing.assert_close(out.last_hidden_state, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-4, atol=1e-5)
print("loaded")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.embed(ids))


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    from safetensors.torch import load_file

    gm = fx.symbolic_trace(Tied())
    fxprune.save(gm, tmp_path)
    assert list(load_file(tmp_path / "weights.safetensors")) == ["embed.weight"]
    loaded = fxprune.load(tmp_path)
    assert loaded.out.weight is loaded.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    assert_same_outputs(loaded(ids), gm(ids))


class Scale(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class WithLeaf(nn.Module):
    def __init__(self, leaf):
        super().__init__()
        self.leaf = leaf

    def forward(self, x):
        return self.leaf(x)


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Scale) or super().is_leaf_module(m, qualname)


def _traced(leaf):
    root = WithLeaf(leaf)
    return fx.GraphModule(root, LeafTracer().trace(root))


def test_custom_leaf_module_with_a_module_level_function_round_trips(tmp_path):
    gm = _traced(Scale(torch.tanh))
    loaded = fxprune.load(fxprune.save(gm, tmp_path))
    assert type(loaded.leaf) is Scale and loaded.leaf.fn is torch.tanh


def test_a_lambda_is_refused_when_saving_with_the_attribute_named(tmp_path):
    with pytest.raises(SerializationError, match=r"leaf\.fn.*lambda"):
        fxprune.save(_traced(Scale(lambda x: x * 2)), tmp_path)


def test_hooks_are_refused_when_saving(tmp_path):
    gm = fx.symbolic_trace(models.ResidualCNN())
    gm.head.register_forward_hook(lambda *args: None)
    with pytest.raises(SerializationError, match="head.*hooks"):
        fxprune.save(gm, tmp_path)


def test_load_of_a_folder_that_is_not_a_saved_model_is_a_clear_error(tmp_path):
    with pytest.raises(SerializationError, match="not a folder written by fxprune.save"):
        fxprune.load(tmp_path)


@pytest.mark.parametrize("value", [
    (1, 2.5, "a", None, True), [1, (2, 3)], {"a": 1, 2: (3,)}, slice(1, None, 2), Ellipsis, torch.float16,
    torch.device("cpu"), torch.Size([2, 3]), float("inf"), torch.channels_last, torch.add, torch.ops.aten.add.Tensor,
    nn.Conv2d])
def test_values_encode_to_json_and_back(value):
    import json

    data = json.loads(json.dumps(encode(value)))
    back = decode(data)
    assert back == value and type(back) is type(value)
