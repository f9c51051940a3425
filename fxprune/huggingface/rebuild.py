"""What a model rebuilt from its config (what ``from_pretrained`` builds) would differ in from the model itself.

The rebuild puts parameters on the meta device (nothing allocated) and computes buffers for real, so that the
VALUES of non-persistent buffers can be compared too: they are not saved, and a rebuild recomputes them from the
config. Gemma's ``embed_scale`` is sqrt(hidden_size): pruned in place it must stay sqrt of the ORIGINAL width,
which a rebuild from the pruned config gets wrong; its value is recorded and restored on loading.

Example::

    >>> diff = differences(model)          # Gemma, hidden size pruned 64 -> 48
    >>> diff.buffers
    {'model.embed_tokens.embed_scale': 8.0}
    >>> diff.size                           # what :func:`fxprune.huggingface.config_update.update_config` minimises
    1
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn


class Differences(NamedTuple):
    shapes: dict      # tensor name -> the model's shape, where a rebuild's differs
    attributes: dict  # "module.attr" -> the model's int/float value, where a rebuild's differs
    buffers: dict     # unsaved tensor (non-persistent buffer ...) -> the model's value (a list) where a rebuild differs
    extra: list       # tensors a rebuild has and the model has not (OPT's project_in when the widths differ)
    theirs: dict = {}  # "module.attr" -> the rebuild's value, for every entry of ``attributes``

    @property
    def size(self) -> int:
        return len(self.shapes) + len(self.attributes) + len(self.buffers) + len(self.extra)


@contextlib.contextmanager
def parameters_on_meta():
    """Inside it, every parameter a module registers goes to the meta device; buffers are built for real.

    Example: ``with parameters_on_meta(): fresh = LlamaForCausalLM(config)`` allocates only the buffers.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def rebuild(model: nn.Module, config=None) -> nn.Module | None:
    """``type(model)(config)`` with parameters on meta, or None if the class refuses the config."""
    return try_rebuild(model, config)[0]


def try_rebuild(model: nn.Module, config=None) -> tuple:
    """``(rebuilt model or None, why not)``: a transformers model is ``type(model)(config)`` after the config's
    own ``validate()`` (the checks ``save_pretrained`` runs, transformers >= 5); a model whose config is a mapping
    (diffusers' FrozenDict) is ``type(model).from_config(dict(config))``. Parameters go to the meta device."""
    config = model.config if config is None else config
    try:
        with _quiet():  # probes try values no user chose (a pad token of 256): their warnings are not the user's
            if isinstance(config, Mapping):
                with parameters_on_meta():
                    return type(model).from_config(dict(config)), ""
            config = copy.deepcopy(config)
            getattr(config, "validate", lambda: None)()
            with parameters_on_meta():
                return type(model)(config), ""
    except Exception as exc:  # e.g. a ValueError from the class's own consistency checks
        return None, f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _quiet():
    """Log records up to WARNING and Python warnings are dropped inside (a rebuild is fxprune's own business)."""
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def differences(model: nn.Module, config=None) -> Differences | None:
    """What a rebuild from ``config`` (the model's own by default) gets wrong, or None if it cannot be built."""
    fresh = rebuild(model, config)
    if fresh is None:
        return None
    mine, theirs = _named_tensors(model), _named_tensors(fresh)
    shapes = {name: list(t.shape) for name, t in mine.items() if name not in theirs or theirs[name].shape != t.shape}
    extra = sorted(theirs.keys() - mine.keys())
    buffers = {}
    for name in unsaved(model):
        other = theirs.get(name)
        value = mine[name]
        if other is not None and other.device.type == "meta" and value.device.type != "meta":
            other = _initialised(fresh, name)  # a parameter (Marian's sinusoidal positions): transformers' value
        if other is None or other.device.type == "meta" or value.device.type == "meta":
            continue  # no value to compare (a model on the meta device: prune_checkpoint)
        if other.shape != value.shape or not torch.equal(other.to(value.dtype), value.detach().cpu()):
            buffers[name] = value.detach().cpu().tolist()
            shapes.pop(name, None)  # restored with its value
    attributes, their_values, fresh_modules = {}, {}, dict(fresh.named_modules())
    for name, module in model.named_modules():
        other = vars(fresh_modules[name]) if name in fresh_modules else {}
        for attr, value in vars(module).items():
            if _plain_size(value) and attr in other and other[attr] != value and type(other[attr]) is type(value):
                key = f"{name}.{attr}" if name else attr
                attributes[key], their_values[key] = value, other[attr]
    return Differences(shapes, attributes, buffers, extra, their_values)


def _plain_size(value) -> bool:
    """An int or float attribute, or a tuple of ints (OLMo's weightless LayerNorm's ``normalized_shape``)."""
    return type(value) in (int, float) or (type(value) is tuple and bool(value) and all(type(v) is int for v in value))


def _initialised(fresh: nn.Module, name: str) -> torch.Tensor | None:
    """The value transformers gives the unsaved parameter ``name`` of a rebuild when it loads a checkpoint
    without it: its owner module is materialised alone and initialised by the model's own ``_init_weights``
    (Marian's ``create_weight()`` for its sinusoidal positions). None where that is not possible."""
    owner_name, _, attr = name.rpartition(".")
    init_weights = getattr(fresh, "_init_weights", None)
    try:
        owner = fresh.get_submodule(owner_name)
        owner.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            init_weights(owner)
        value = getattr(owner, attr)
    except Exception:  # no transformers initialisation for it: the values cannot be compared
        return None
    return value if isinstance(value, torch.Tensor) and value.device.type != "meta" else None


def unsaved(model: nn.Module) -> list:
    """Names of the tensors ``save_pretrained`` leaves out, which a rebuild recomputes from the config:
    non-persistent buffers, and tensors matching the class's ``_keys_to_ignore_on_save`` (Marian's sinusoidal
    position table, a parameter)."""
    names = [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None]
    patterns = ignored_on_save(model)
    return names + [name for name in _named_tensors(model) if any(re.search(p, name) for p in patterns)]


def ignored_on_save(model: nn.Module) -> list:
    """The regular expressions of tensor names that ``save_pretrained`` does not write (transformers' own)."""
    return list(getattr(model, "_keys_to_ignore_on_save", None) or [])


def _named_tensors(model: nn.Module) -> dict:
    """Every tensor under every name: a tied weight (Gemma's lm_head) is compared under both of its names."""
    out = dict(model.named_buffers(remove_duplicate=False))
    out.update(dict(model.named_parameters(remove_duplicate=False)))
    return out
