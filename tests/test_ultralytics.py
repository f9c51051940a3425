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
