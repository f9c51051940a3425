"""Shapes of a graph's tensors as they are, or as they would be after a removal plan.

MAC and parameter counts only need shapes. :class:`GraphShapes` reads them from
``node.meta["val"]`` (FakeTensor propagation) and from the module's tensors;
:class:`PlannedShapes` gives the sizes every axis would have if a plan were
applied, from the solved layouts, without slicing or rewriting anything. That
makes ``count`` of a plan as cheap as a walk over the graph, which is what a
ratio search for ``target_macs`` needs.

Example::

    >>> dg = fxprune.analyze(model, (x,))
    >>> shapes = PlannedShapes(dg, {dg.prunable_groups[0]: [0, 1]})
    >>> shapes.param("conv1.weight")          # two output channels fewer
    (6, 3, 3, 3)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.algebra.layout import new_size
from fxprune.analysis.removal import kept_units


class GraphShapes:
    """Shapes as the (propagated) graph has them."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        tensors = dict(gm.named_buffers(remove_duplicate=False))
        tensors.update(dict(gm.named_parameters(remove_duplicate=False)))
        self.tensors = tensors

    def node(self, node) -> tuple | None:
        """Shape of a node's tensor value; ``None`` for non-tensors (ints, tuples, None)."""
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None

    def param(self, name: str) -> tuple | None:
        t = self.tensors.get(name)
        return tuple(t.shape) if t is not None else None

    def parameter_count(self) -> int:
        seen, total = set(), 0
        for name, p in self.gm.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += _prod(self.param(name))
        return total


class PlannedShapes(GraphShapes):
    """Shapes after removing ``removal`` (``{group: units}``) from ``dg``, computed from layouts."""

    def __init__(self, dg, removal: dict):
        super().__init__(dg.gm)
        self.dg = dg
        self.kept = kept_units(dg, removal)  # validates the plan exactly as rewrite will
        self._cache: dict[tuple, tuple] = {}

    def _resize(self, key: tuple, shape: tuple | None) -> tuple | None:
        if shape is None or not self.kept:
            return shape
        if key not in self._cache:
            layouts = self.dg.layouts
            self._cache[key] = tuple(
                new_size(layouts[(key, d)], self.kept, self.dg.solver) if (key, d) in layouts else s
                for d, s in enumerate(shape))
        return self._cache[key]

    def node(self, node) -> tuple | None:
        shape = super().node(node)
        if not isinstance(node, fx.Node):
            return shape
        key = self.dg.state.param_key(node.target) if node.op == "get_attr" else ("v", node.name, ())
        return self._resize(key, shape)

    def param(self, name: str) -> tuple | None:
        return self._resize(self.dg.state.param_key(name), super().param(name))


def _prod(shape) -> int:
    out = 1
    for s in shape or ():
        out *= int(s)
    return out
