"""ultralytics detection models (YOLOv8n, YOLO11n) built from their yaml: random weights, nothing downloaded.

In eval mode the Detect head reads its stride buffer with ``.item()`` (``make_anchors``'s ``new_full``), which
FakeTensor cannot run: propagation runs those nodes for real and says so. symbolic_trace cannot follow the
head's ``if self.dynamic or self.shape != shape``, so the model is exported, and the export runs the head's
first-call caching (``self.anchors``, ``self.strides``, ``self.shape``), which capture must undo on the caller's
model. Images of 64x64 keep it fast: about 25 s for the file on 2 shared cores.

Example::

    python -m pytest -q tests/test_ultralytics.py
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune.testing import assert_same_outputs, run_oracle

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics is not installed (a test extra: pip install ultralytics)", allow_module_level=True)

IMAGE = (1, 3, 64, 64)


@pytest.fixture
def yolo(no_network):
    """ultralytics' ``YOLO`` class, imported offline (its import checks DNS unless YOLO_OFFLINE is set); the first
    test's import runs inside ``no_network``'s watch."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    return YOLO


def detector(yolo, yaml: str) -> torch.nn.Module:
    """The ``DetectionModel`` inside ``YOLO(yaml)``, seeded, in eval mode (the inference path users prune)."""
    torch.manual_seed(0)
    return yolo(yaml).model.eval()


def _cached_fakes(model: torch.nn.Module) -> list[str]:
    return [f"{name}.{key}" for name, m in model.named_modules() for key, v in vars(m).items()
            if isinstance(v, FakeTensor)]


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolo11n.yaml"])
def test_detection_model_prunes_exactly(yolo, yaml):
    model = detector(yolo, yaml)
    x = torch.randn(IMAGE)
    with pytest.warns(UserWarning, match=r"read tensor values.*'item'.*run for real on the example inputs"):
        dg, removal, pruned = run_oracle(model, (x,))  # planted dead units removed: outputs unchanged
    read = dg.gm.meta["fxprune_value_dependent"]
    assert read and all(name.startswith("item") for name in read), read
    assert all("fxprune_concrete" in dg.gm.graph.find_nodes(op="call_function", target=n.target)[0].meta
               for n in dg.gm.graph.nodes if n.name in read)
    # every C2f, SPPF and neck width is a group (YOLOv8n: 56, YOLO11n: 69), and the oracle pruned them all
    assert len(removal) >= 50 and len(removal) == len([g for g in dg.prunable_groups if not g.normalized])
    assert not _cached_fakes(model)


def test_prune_as_users_call_it(yolo):
    model = detector(yolo, "yolov8n.yaml")
    x = torch.randn(IMAGE)
    before = copy.deepcopy(model)(x)  # not the model itself: its first call caches anchors the export would reuse
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    head = model.model[-1]
    with pytest.warns(UserWarning, match="read tensor values"):
        pruned = fxprune.prune(model, 0.3, example_inputs=(x,), ignore=[head])
    after = pruned(x)
    leaves, spec = tree_flatten(after)
    expected, expected_spec = tree_flatten(before)
    assert spec == expected_spec and [t.shape for t in leaves] == [t.shape for t in expected]
    assert fxprune.count(pruned, (x,))[0] < 0.8 * fxprune.count(model, (x,))[0]  # 0.72: the head is kept whole
    for name, tensor in head.state_dict().items():  # the ignored head keeps every width
        assert pruned.get_submodule("model.22").state_dict()[name].shape == tensor.shape, name
    # the caller's model: same tensors, no attribute the capture left behind, same outputs
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    assert not _cached_fakes(model)
    assert_same_outputs(model(x), before)


def _one_training_step(model: torch.nn.Module):
    """One SGD step with ultralytics' own detection loss (box, class and DFL terms, from ``model.args``) on two
    64x64 images with one box each; returns the loss items (a tensor, or a dict in newer releases)."""
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()
    model.train()
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[3.0], [7.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.4, 0.6, 0.2, 0.2]])}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, items = model.loss(batch)
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    optimizer.step()
    return items


def test_pruned_in_place_is_still_a_detection_model_that_computes_the_pruned_graph_and_trains(yolo):
    """YOLOv8n pruned in place (its Detect head ignored, as users do): the caller's ``DetectionModel`` itself, whose
    own forward (C2f's ``chunk``; ``self.c``, read only by ``forward_split``, follows) equals the pruned graph at a
    batch of one and of three, with fewer FLOPs, and then takes a training step with ultralytics' own loss."""
    model = detector(yolo, "yolov8n.yaml")
    x = (torch.randn(IMAGE),)
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="read tensor values"):
        assert fxprune.prune(model, 0.3, example_inputs=x, ignore=[model.model[-1]], inplace=True) is model
        graph = fxprune.replay(fxprune.plan_of(model), original, x, inplace=False)
    assert type(model).__name__ == "DetectionModel"
    assert fxprune.testing.forward_flops(model, x) < 0.8 * fxprune.testing.forward_flops(original, x)
    fxprune.testing.assert_in_place_matches_graph(model, graph, x)
    assert model.model[2].c == model.model[2].cv1.conv.out_channels // 2  # C2f's split width
    assert not _cached_fakes(model)
    _trains(model)


def test_yolo11_pruned_in_place_takes_a_training_step_with_ultralytics_loss(yolo):
    """YOLO11n: a block whose own forward cannot hold the plan (its C2PSA attention block) keeps its widths, a
    warning names the line, and the rest is pruned; the caller's ``DetectionModel`` then trains."""
    model = detector(yolo, "yolo11n.yaml")
    with pytest.warns(UserWarning, match="read tensor values"):
        fxprune.prune(model, 0.3, example_inputs=(torch.randn(IMAGE),), ignore=[model.model[-1]], inplace=True)
    assert type(model).__name__ == "DetectionModel"
    assert model.model[2].cv1.conv.out_channels < 32  # C3k2's widths were pruned
    _trains(model)


def _trains(model: torch.nn.Module) -> None:
    """One training step with ultralytics' loss gives finite box, class and DFL losses, and the model then still
    detects in eval mode (84 = 4 box coordinates + 80 classes per anchor)."""
    items = _one_training_step(model)
    values = torch.as_tensor(list(items.values()) if isinstance(items, dict) else items)
    assert torch.isfinite(values).all() and values.numel() == 3  # box, class and DFL losses
    with torch.no_grad():
        assert model.eval()(torch.randn(IMAGE))[0].shape[:2] == (1, 84)
