"""Per-op rules, one table (:data:`fxprune.rules.registry.RULES`); importing this package fills it.

Each rule states, for one op (an aten overload, a torch function, a module class, a method), how the axes of its
inputs and outputs relate, in the axis algebra (:mod:`fxprune.algebra`): ``@register(op)`` next to the rule, op
families as one-liners (:func:`~fxprune.rules.registry.family`). Analysis looks rules up while relating a graph
(:mod:`fxprune.analysis.relate`). Rules may import only ``fxprune.errors``, ``fxprune.modules`` and
``fxprune.algebra`` (and each other): never analysis or anything above it.
"""

from fxprune.rules import (  # noqa: F401 - imported for their registrations
    aten,
    attention,
    constants,
    conv,
    elementwise,
    extra,
    linear,
    misc,
    norm,
    recurrent,
    reduction,
    routing,
    segments,
    shape,
    spatial,
    torchvision_ops,
)
from fxprune.rules.registry import RULES, family, lookup, register

__all__ = ["RULES", "family", "lookup", "register"]
