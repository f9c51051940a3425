"""Python values <-> JSON, for graphs, module attributes and plans saved without pickle.

JSON has no tuples, dtypes, slices, callables or node references, so those are
written as tagged objects ``{"$": tag, "v": ...}``; everything JSON has natively
(None, bools, ints, finite floats, strings, lists) is written as it is. Dicts
are always tagged, so that a user dict can never be mistaken for a tag.

Callables and classes are written by qualified name and imported back, so a
name that does not import back to the very same object (a lambda, a function
defined inside another function) is refused when saving, not when loading.

Example::

    >>> encode((1, torch.float16, slice(None, 2)))
    {'$': 'tuple', 'v': [1, {'$': 'dtype', 'v': 'float16'}, {'$': 'slice', 'v': [None, 2, None]}]}
    >>> decode(encode(operator.add)) is operator.add
    True
"""

from __future__ import annotations

import builtins
import enum
import importlib
import math
import types

import numpy as np
import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from fxprune.errors import FxPruneError


class SerializationError(FxPruneError):
    """A value, module or graph that cannot be written without pickle (or read back)."""


def encode(value, where: str = "value", tensor_ref=None):
    """``value`` as JSON-compatible data; ``tensor_ref(t)`` may name a tensor (else tensors are refused)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):  # before int: IntEnum members are ints
        return {"$": "enum", "class": qualified_name(type(value), where), "v": value.name}
    if isinstance(value, np.generic):  # numpy scalars in module attributes come back as Python numbers
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
    if isinstance(value, fx.Node):
        return {"$": "node", "v": value.name}
    if isinstance(value, torch.Size):
        return {"$": "size", "v": list(value)}
    if isinstance(value, tuple):
        return {"$": "tuple", "v": [encode(v, where, tensor_ref) for v in value]}
    if isinstance(value, list):
        return [encode(v, where, tensor_ref) for v in value]
    if isinstance(value, dict):
        return {"$": "dict", "v": [[encode(k, where), encode(v, where, tensor_ref)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"$": "set", "v": sorted((encode(v, where, tensor_ref) for v in value), key=repr)}
    if isinstance(value, slice):
        return {"$": "slice", "v": [encode(value.start, where), encode(value.stop, where), encode(value.step, where)]}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, torch.dtype):
        return {"$": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$": "device", "v": str(value)}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {"$": "torch", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        name = tensor_ref(value) if tensor_ref is not None else None
        if name is None:
            raise SerializationError(f"{where}: a tensor of shape {tuple(value.shape)} that is not a parameter "
                                     "or buffer of the model cannot be saved")
        return {"$": "tensor", "v": name}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                          types.WrapperDescriptorType, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                          torch._ops.HigherOrderOperator)):
        return {"$": "object", "v": qualified_name(value, where)}
    raise SerializationError(f"{where}: cannot save a value of type {type(value).__module__}."
                             f"{type(value).__qualname__} without pickle")


def decode(data):
    """The inverse of :func:`encode`; node references and tensors come back as ``("node", name)`` markers.

    Use :func:`decode_with` to resolve them.
    """
    return decode_with(data, node=lambda name: ("node", name), tensor=lambda name: ("tensor", name))


def decode_with(data, node, tensor):
    """Decode, turning node references into ``node(name)`` and tensor references into ``tensor(name)``."""
    def walk(d):
        if isinstance(d, list):
            return [walk(v) for v in d]
        if not isinstance(d, dict):
            return d
        tag, v = d.get("$"), d.get("v")
        if tag == "tuple":
            return tuple(walk(x) for x in v)
        if tag == "dict":
            return {walk(k): walk(x) for k, x in v}
        if tag == "set":
            return {walk(x) for x in v}
        if tag == "node":
            return node(v)
        if tag == "tensor":
            return tensor(v)
        if tag == "float":
            return float(v)
        if tag == "size":
            return torch.Size(v)
        if tag == "slice":
            return slice(*(walk(x) for x in v))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "dtype" or tag == "torch":
            return getattr(torch, v)
        if tag == "device":
            return torch.device(v)
        if tag == "enum":
            return import_object(d["class"])[v]
        if tag == "object":
            return import_object(v)
        raise SerializationError(f"unknown tagged value {d!r} (written by a newer fxprune?)")
    return walk(data)


def qualified_name(obj, where: str = "value") -> str:
    """``module.qualname`` of a function, class or op that imports back to ``obj`` itself."""
    candidates = []
    try:
        candidates.append(_get_qualified_name(obj))
    except (RuntimeError, AttributeError, TypeError):
        pass
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname:
        candidates.append(f"{module}.{qualname}")
    if getattr(builtins, getattr(obj, "__name__", ""), None) is obj:
        candidates.append(f"builtins.{obj.__name__}")
    for name in candidates:
        try:
            if import_object(name) is obj:
                return name
        except SerializationError:
            continue
    raise SerializationError(f"{where}: {obj!r} cannot be saved by name: {candidates[0] if candidates else '?'} "
                             "does not import back to it (a lambda or a function defined inside a function?). "
                             "Define it at module level, or wrap it with torch.fx.wrap at module level.")


def import_object(name: str):
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    if "." not in name:
        if hasattr(builtins, name):
            return getattr(builtins, name)
        raise SerializationError(f"cannot import {name!r}")
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise SerializationError(f"cannot import {name!r}: is the package that defines it installed?")
