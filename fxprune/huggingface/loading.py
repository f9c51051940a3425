"""Loading a model pruned in place, whose config alone cannot describe it.

:func:`load_pretrained` builds the model class named in ``config.architectures``, resizes every tensor
recorded in ``config.fxprune_shapes``, restores ``config.fxprune_attributes`` and the unsaved tensors in
``config.fxprune_buffers``, then loads the saved weights (renamed by transformers' own reversal of its
load-time renaming where a family saves under older names). Example::

    >>> fxprune.prune(model, 0.3, example_inputs=(ids,), inplace=True)
    >>> model.save_pretrained(out)
    >>> reloaded = fxprune.load_pretrained(out)      # same logits as model
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.huggingface.inplace import _named_tensors, set_tensor, update_attributes
from fxprune.huggingface.rebuild import ignored_on_save


def load_pretrained(path: str, **kwargs):
    """Load a model saved after in-place pruning that its config cannot describe; any other model too.

    The model class is ``config.architectures[0]``; every tensor recorded in
    ``config.fxprune_shapes`` is resized, every attribute in
    ``config.fxprune_attributes`` (head_dim, split_size, scaling ...) and every
    unsaved tensor in ``config.fxprune_buffers`` (non-persistent buffers: Gemma's
    embed_scale; ``_keys_to_ignore_on_save``) restored before the saved weights are
    loaded. Weights tied to a loaded one (declared on any submodule: BART's encoder
    and decoder embeddings) need not be in the checkpoint. A checkpoint that
    transformers converts on loading (Mixtral's experts saved one by one) goes
    through ``from_pretrained`` on a model resized as it is built.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    shapes = getattr(config, "fxprune_shapes", None) or {}
    attributes = getattr(config, "fxprune_attributes", None) or {}
    buffers = getattr(config, "fxprune_buffers", None) or {}
    cls = getattr(transformers, config.architectures[0])
    if not shapes and not attributes and not buffers:
        return cls.from_pretrained(path, **kwargs)
    model = cls(config)
    _resize(model, shapes, attributes, buffers)
    state = _checkpoint_names_to_model(model, _load_state_dict(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[n]) for n in parameters.keys() - set(missing)}
    # computed at construction, or restored from the record above: never saved (Marian's sinusoidal positions)
    unsaved = ignored_on_save(model) + list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    missing = [m for m in missing if id(parameters.get(m)) not in loaded and not m.endswith("inv_freq")
               and not any(re.search(pattern, m) for pattern in unsaved)]
    if missing or unexpected:
        try:  # a checkpoint transformers converts on loading (experts saved one by one, stacked into 3-d tensors)
            return _from_pretrained_resized(cls, path, config, shapes, attributes, buffers, **kwargs)
        except Exception as exc:
            raise FxPruneError(f"{path}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}; "
                               f"from_pretrained on the resized model failed too: {type(exc).__name__}: {exc}") from exc
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _resize(model: nn.Module, shapes: dict, attributes: dict, buffers: dict) -> None:
    """The recorded tensor shapes, unsaved tensor values and attributes of a model pruned in place, on a model
    built from its config; tied weights tied again (resized parameters replaced the tied ones)."""
    for name, shape in shapes.items():
        set_tensor(model, name, torch.empty(shape))
    for name, value in buffers.items():
        old = _named_tensors(model)[name]
        set_tensor(model, name, torch.tensor(value, dtype=old.dtype, device=old.device))
    for name, value in attributes.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
    update_attributes(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _from_pretrained_resized(cls, path: str, config, shapes: dict, attributes: dict, buffers: dict, **kwargs):
    """``cls.from_pretrained`` with the model resized as it is built (at the end of its ``post_init``), so that
    transformers' own loader converts the checkpoint (stacking Mixtral's per-expert ``w1``/``w3`` into
    ``gate_up_proj``) into tensors of the pruned shapes. ``cls.post_init`` is put back afterwards."""
    own = cls.__dict__.get("post_init")
    inherited = cls.post_init

    def post_init(self, *args, **kw):
        inherited(self, *args, **kw)
        if type(self) is cls:
            _resize(self, shapes, attributes, buffers)

    cls.post_init = post_init
    try:
        return cls.from_pretrained(path, config=config, **kwargs).eval()
    finally:
        if own is None:
            del cls.post_init
        else:
            cls.post_init = own


def _checkpoint_names_to_model(model: nn.Module, state: dict) -> dict:
    """``state`` under ``model``'s own tensor names: transformers >= 5 saves some families (Swin) under older
    checkpoint names, which ``from_pretrained`` renames on loading. The renaming is read from transformers' own
    reversal (checkpoint name -> the model's tensor object); keys it does not rename stay as they are."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: checkpoints use the model's names
        return state
    tensors = model.state_dict(keep_vars=True)
    own = {id(t): name for name, t in tensors.items()}
    try:
        reverted = revert_weight_conversion(model, tensors)
    except Exception:  # a conversion that cannot be reversed by name: keep the names
        return state
    # a saved name that is already one of the model's stays: tied tensors share one id under two names
    # (GPT-2's wte and lm_head), so mapping by id alone would rename one onto the other
    names = {saved: own[id(t)] for saved, t in reverted.items() if id(t) in own and saved not in tensors}
    return {names.get(key, key): tensor for key, tensor in state.items()}


def _load_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state
