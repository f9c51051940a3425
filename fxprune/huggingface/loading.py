"""Loading a model pruned in place, whose config alone cannot describe it.

:func:`load_pretrained` lets transformers' own ``from_pretrained`` load the checkpoint into a model resized as it
is built: the model is built on the meta device (nothing allocated), every tensor recorded in
``config.fxprune_shapes`` is resized there and ``config.fxprune_attributes`` restored, then transformers
materialises only the pruned tensors, in the saved dtype (or the caller's ``dtype=``), renames or converts
checkpoint keys as it does for any checkpoint, ties weights and recomputes what is never saved (rotary
``inv_freq``); the unsaved tensors of ``config.fxprune_buffers`` are put back last. Example::

    >>> fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True)
    >>> model.save_pretrained(out)
    >>> reloaded = fxprune.load_pretrained(out)      # same logits as model, same dtype
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from fxprune.dotted import set_attribute
from fxprune.errors import FxPruneError
from fxprune.huggingface.attributes import update_attributes
from fxprune.rewriting.inplace.tensors import parameters_and_buffers as tensors_by_name
from fxprune.rewriting.inplace.tensors import set_tensor
from fxprune.huggingface.layers import ZERO_MODULES, restore_zero_modules
from fxprune.huggingface.rebuild import ignored_on_save


def load_pretrained(path: str, **kwargs):
    """Load a model saved after in-place pruning that its config cannot describe; any other model too.

    The model class is ``config.architectures[0]``; keyword arguments go to its ``from_pretrained`` (``dtype``:
    by default the config's, as transformers does). The model is built on the meta device and resized there
    before any tensor is allocated: every tensor recorded in ``config.fxprune_shapes`` takes its pruned shape,
    every attribute in ``config.fxprune_attributes`` (head_dim, split_size, scaling ...) is restored, and
    transformers' loader then materialises the pruned tensors only (peak memory: the pruned model, never the
    original-size one), converting checkpoints it converts on loading (Mixtral's experts saved one by one,
    stacked into 3-d tensors). Every unsaved tensor in ``config.fxprune_buffers`` (non-persistent buffers:
    Gemma's embed_scale; ``_keys_to_ignore_on_save``: Marian's sinusoidal positions) gets its recorded value.
    Modules recorded in ``config.fxprune_zero_modules`` (residual branches removed in place,
    :mod:`fxprune.huggingface.layers`) are built as the ``ZeroBranch`` that replaced them.
    A weight the checkpoint lacks that is neither tied to a loaded one nor recomputed by transformers is an
    error, never a random initialisation.

    Example::

        >>> model = fxprune.load_pretrained("llama-pruned", dtype=torch.bfloat16)
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    shapes = getattr(config, "fxprune_shapes", None) or {}
    attributes = getattr(config, "fxprune_attributes", None) or {}
    buffers = getattr(config, "fxprune_buffers", None) or {}
    zero = getattr(config, ZERO_MODULES, None) or {}  # branches removed in place (huggingface/layers.py)
    cls = getattr(transformers, config.architectures[0])
    if not shapes and not attributes and not buffers and not zero:
        return cls.from_pretrained(path, **kwargs)
    info = kwargs.pop("output_loading_info", False)
    model, loading = _from_pretrained_resized(cls, path, config, shapes, attributes, **kwargs)
    _check_loaded(path, model, loading)
    for name, value in buffers.items():  # after loading: transformers recomputes them from the config
        old = tensors_by_name(model)[name]
        set_tensor(model, name, torch.tensor(value, dtype=old.dtype, device=old.device))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return (model, loading) if info else model


def _check_loaded(path: str, model: nn.Module, loading: dict) -> None:
    """Raise on a weight the checkpoint lacks (transformers would initialise it at random) or has in excess,
    unless transformers itself never saves it (``_keys_to_ignore_on_save``: recorded in ``fxprune_buffers``)."""
    unsaved = ignored_on_save(model)
    missing = [m for m in loading.get("missing_keys", ()) if not any(re.search(p, m) for p in unsaved)]
    mismatched = list(loading.get("mismatched_keys", ()))
    unexpected = list(loading.get("unexpected_keys", ()))
    if missing or mismatched or unexpected:
        raise FxPruneError(f"{path}: the checkpoint does not fit the model resized from its config "
                           f"(fxprune_shapes): missing weights {sorted(missing)[:5]}, weights of other shapes "
                           f"{mismatched[:5]}, unexpected weights {sorted(unexpected)[:5]}")


def _resize(model: nn.Module, shapes: dict, attributes: dict) -> None:
    """The recorded tensor shapes and attributes of a model pruned in place, on a model built from its config
    (on the meta device inside ``from_pretrained``: the new tensors are empty meta tensors of the model's dtype);
    tied weights tied again (resized parameters replaced the tied ones). Branches removed in place get their
    ``ZeroBranch`` modules back first."""
    restore_zero_modules(model, model.config)
    for name, shape in shapes.items():
        old = tensors_by_name(model)[name]
        set_tensor(model, name, torch.empty(shape, dtype=old.dtype, device=old.device))
    _set_attributes(model, attributes)  # head_dim first: update_attributes counts heads by it
    update_attributes(model)
    _set_attributes(model, attributes)  # recorded from the pruned model, they overrule update_attributes' guesses
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _set_attributes(model: nn.Module, attributes: dict) -> None:
    for name, value in attributes.items():
        set_attribute(model, name, tuple(value) if isinstance(value, list) else value)  # a list in JSON


def _from_pretrained_resized(cls, path: str, config, shapes: dict, attributes: dict, **kwargs):
    """``cls.from_pretrained`` with the model resized as it is built (at the end of its ``post_init``, still on
    the meta device), so that transformers' own loader fills tensors of the pruned shapes. ``cls.post_init`` is
    put back afterwards. Returns (model, loading info)."""
    own = cls.__dict__.get("post_init")
    inherited = cls.post_init

    def post_init(self, *args, **kw):
        inherited(self, *args, **kw)
        if type(self) is cls:
            _resize(self, shapes, attributes)

    cls.post_init = post_init
    try:
        return cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    finally:
        if own is None:
            del cls.post_init
        else:
            cls.post_init = own
