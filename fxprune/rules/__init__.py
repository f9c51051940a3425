"""Per-op rules, one table (:data:`fxprune.rules.registry.RULES`); importing this package fills it."""

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
