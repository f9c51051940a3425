"""Graph code with side effects: the model's own helpers that mutate a tensor or a list.

Both come from torchvision's video models, pruned wrongly or not at all before:
MViT calls ``_add_shortcut(x, q)`` (a ``torch.fx.wrap``ped ``x.add_(q)``) only for its
side effect, so dead-code elimination dropped it and every pruned MViT was wrong;
Swin3D's ``_get_window_and_shift_size`` assigns into its list arguments, which the
shape propagator passed as fx's immutable lists.

Example::

    python -m pytest -q tests/test_side_effects.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import plant_dead_units
from tests.models import CachesOnSelf, skip_unless_symbolically_traceable


def add_into(x, shortcut):
    x.add_(shortcut)
    return x


def clamp_window(window, size):
    for i in range(2):
        if size[i] < window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("add_into")
torch.fx.wrap("clamp_window")


class SideEffectOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.d, self.e = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        add_into(y, h)  # the result is unused: only the mutation matters
        return self.c(y) + self.e(self.d(x).relu())


class MutatesItsList(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv2(self.conv1(x).relu())
        return F.avg_pool2d(y, clamp_window([7, 7], y.shape[-2:]))


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_side_effect_only_call_survives_rewriting():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    dg = fxprune.analyze(SideEffectOnly().eval(), (x,))
    with torch.no_grad():
        reference = dg.gm(x)
        unchanged = fxprune.apply(dg, {})
        assert "add_into" in unchanged.code
        torch.testing.assert_close(unchanged(x), reference)
        removal = plant_dead_units(dg, seed=0)
        assert removal, "d -> e hidden units are prunable"
        planted = dg.gm(x)
        assert _relative(fxprune.apply(dg, removal)(x), planted) < 1e-6


def test_helper_that_assigns_into_its_list_argument_propagates():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)  # 4 < 7: the helper clamps the window in place
    model = MutatesItsList().eval()
    skip_unless_symbolically_traceable(model)
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), round_to=1)
    assert pruned(x).shape == model(x).shape == (2, 4, 1, 1)
    assert pruned.get_submodule("conv1").out_channels == 4


@pytest.mark.parametrize("branch", [True, False], ids=["export", "trace"])
def test_capture_leaves_no_attribute_on_the_callers_model(branch):
    # ultralytics' Detect head caches anchors and the input shape on its first call; run by torch.export those
    # were FakeTensors left on the caller's model, and its next real call reused them and failed
    model, x = CachesOnSelf(branch).eval(), torch.randn(1, 3, 8, 8)
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export fallback's note
        dg = fxprune.analyze(model, (x,))
    assert dg.gm.meta.get("fxprune_capture") == ("export" if branch else None)
    for name, m in model.named_modules():
        assert vars(m).keys() == attributes[name].keys(), name
        assert all(vars(m)[k] is v for k, v in attributes[name].items()), name
    expected = CachesOnSelf(branch).eval()
    expected.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), expected(x), atol=1e-6, rtol=0)
