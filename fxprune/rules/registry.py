"""The one rule table: op -> function that states axis relations for a node.

Keys are module classes (``call_module``, looked up along the class's MRO),
callables (``call_function``: Python functions, builtins, aten overloads) and
strings (``call_method``: the method name). A rule receives a
:class:`fxprune.algebra.context.RuleContext` and emits relations on it.

Worked example (a user rule for a custom module)::

    import fxprune

    @fxprune.register_rule(MyScale)
    def my_scale(r):
        x, out = r.input(0), r.out
        for d in range(x.ndim):
            r.same(x[d], out[d])
        r.same(r.param("gain")[0], out[1])

Registering the same key twice raises :class:`DuplicateRuleError`; pass
``replace=True`` to override a built-in rule deliberately.

Keys may also be ``"module:qualname"`` strings for functions of optional libraries (timm, torchvision), which then
need no import when fxprune is imported. ``register(*targets)`` is a decorator; ``family(rule, *targets)`` registers
an op family in one line. A module rule *is* the functional rule: ``RuleContext.bind(signature)`` binds the node's
arguments and fills missing parameters from the module's attributes of the same name (``weight``, ``groups``,
``normalized_shape`` ...), as ``TensorRef``s for tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from fxprune.errors import DuplicateRuleError

RULES: dict[object, Callable] = {}


def register(*targets, replace: bool = False):
    """Decorator registering one rule for every target (module class, callable or method name).

    A function of an optional library is named ``"module:qualname"``
    (``"timm.layers.attention:maybe_add_mask"``): it matches that function without
    importing the library, so ``import fxprune`` does not pay for timm or torchvision.
    """

    def decorate(rule: Callable) -> Callable:
        targets_once = list(dict.fromkeys(targets))  # aliases such as F.conv1d is torch.conv1d count once
        for target in targets_once:  # check every target first: a failed registration registers nothing
            if target in RULES and not replace:
                raise DuplicateRuleError(
                    f"a rule for {_name(target)} is already registered ({RULES[target].__qualname__}); "
                    "pass replace=True to override it"
                )
        for target in targets_once:
            RULES[target] = rule
        return rule

    return decorate


def family(rule: Callable, *targets, replace: bool = False) -> None:
    """Register a shared rule for an op family in one line: ``family(elementwise, torch.tanh, "tanh")``."""
    register(*targets, replace=replace)(rule)


def lookup(node, module: nn.Module | None = None) -> Callable | None:
    """The rule for an fx node, or None when the op has none."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls]
        return None
    if node.op == "call_method":
        return RULES.get(node.target)
    if node.op == "call_function":
        return by_function(RULES, node.target)
    return None


def by_function(table: dict, target):
    """``table``'s entry for a function: by the object, else by its ``"module:qualname"``, else None."""
    try:
        found = table.get(target)
    except TypeError:  # unhashable callables have no entry
        return None
    return found if found is not None else table.get(qualified_name(target))


def qualified_name(target) -> str | None:
    """``"module:qualname"`` of a function, the key of rules registered by name."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else None


def _name(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def op_name(target) -> str:
    """``"mean"`` for torch.mean, ``"mean"`` (a method), and ``aten.mean.dim`` alike."""
    if isinstance(target, str):
        return target
    return getattr(target, "_opname", None) or getattr(target, "__name__", "")


def aten_overloads(*names: str) -> list:
    """Every overload of the named aten ops that this torch build has (a name it lacks gives none), for
    ``register``: ``aten_overloads("topk")`` -> ``[aten.topk.default, aten.topk.values]``."""
    out = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            out.extend(getattr(packet, o) for o in packet.overloads())
    return out
