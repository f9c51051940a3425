"""Depth pruning in place on a Hugging Face model: what transformers adds to the generic step.

Layers leave their list and removed branches become ``ZeroBranch`` modules by the generic step
(:mod:`fxprune.rewriting.inplace.depth`, on the one in-place mechanism: the model's own forward checked against
the pruned graph at two batch sizes, ``generate`` with a cache, everything put back on failure).
:class:`HuggingFaceDepth`, the Hugging Face extension of that mechanism, adds, all found without model names:

- the layer count in the config: every integer field (of the config or a sub-config) equal to the list's old
  length is tried at the new length, and kept where a model rebuilt from the config on the meta device
  (:func:`fxprune.huggingface.rebuild.rebuild`) has a list of the new length (``num_hidden_layers``; a field
  that happens to have the same value, ``num_attention_heads = 4`` with 4 layers, does not shorten the list);
- per-layer lists of the config (``layer_types``, any list whose length is the layer count) keep the entries of
  the kept layers;
- what earlier in-place pruning recorded by module path (``config.fxprune_shapes`` and the other ``fxprune_*``
  records) follows the new names; entries of removed layers go.

Plain ``from_pretrained`` reloads a model whose layers were removed. A branch removed alone leaves
``ZeroBranch`` modules, recorded in ``config.fxprune_zero_modules`` (``{path: {"outputs", "cache",
"layer_idx"}}``): :func:`fxprune.load_pretrained` puts them back on reloading; plain ``from_pretrained`` would
build the replaced modules with random weights.

Example::

    >>> fxprune.prune(model, layers=2, example_inputs=(ids,), inplace=True, calibration=batches)
    >>> model.config.num_hidden_layers, len(model.model.layers)
    (2, 2)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""
from __future__ import annotations

import torch.nn as nn

from fxprune.dotted import owner_of
from fxprune.errors import FxPruneError
from fxprune.huggingface.inplace import HuggingFace
from fxprune.huggingface.rebuild import rebuild
from fxprune.modules.zero import ZeroBranch
from fxprune.rewriting.inplace import Change
from fxprune.rewriting.inplace.depth import DepthHooks

ZERO_MODULES = "fxprune_zero_modules"  # config field: {module path: ZeroBranch arguments}


class HuggingFaceDepth(HuggingFace, DepthHooks):
    """The Hugging Face extension for depth pruning in place (see module docstring): the config saved and put
    back with the model, the forward compared without a cache, ``generate`` with one; no tensor changed width, so
    no attribute or config field follows a width."""

    def __init__(self, dg) -> None:
        super().__init__(dg, {})

    def update_attributes(self, change: Change) -> None:
        pass  # no width changed: nothing restates one

    def update_config(self, change: Change) -> dict:
        return {}  # the layer count and per-layer lists follow in layers_removed

    def layers_removed(self, model: nn.Module, parent: str, renamed: dict) -> None:
        if getattr(model, "config", None) is None:
            return
        kept = [i for i, new in enumerate(renamed.values()) if new is not None]
        _update_config(model, parent, len(renamed), kept)
        _rename_records(model.config, renamed)

    def branch_replaced(self, model: nn.Module, path: str, spec: dict) -> None:
        config = getattr(model, "config", None)
        if config is None:
            return
        record = dict(getattr(config, ZERO_MODULES, None) or {})
        record[path] = spec
        setattr(config, ZERO_MODULES, record)
        _drop_records(config, path)


def restore_zero_modules(model: nn.Module, config) -> None:
    """Put back the :class:`ZeroBranch` modules recorded in ``config.fxprune_zero_modules`` (``load_pretrained``
    calls this on the model it builds, before loading the checkpoint)."""
    for path, spec in (getattr(config, ZERO_MODULES, None) or {}).items():
        parent, name = owner_of(model, path)
        parent._modules[name] = ZeroBranch(spec["outputs"], spec.get("cache"), spec.get("layer_idx"))


# -- config ------------------------------------------------------------------------------------------------------

def _configs(config):
    """The config and its sub-configs (a multimodal model's ``text_config``)."""
    yield config
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type") and value is not config:
            yield from _configs(value)


def _update_config(model: nn.Module, parent: str, count: int, kept: list) -> None:
    """The layer count and the per-layer lists of the config (see module docstring)."""
    new = len(kept)
    lists = [(c, k) for c in _configs(model.config) for k, v in vars(c).items()
             if isinstance(v, (list, tuple)) and len(v) == count and count >= 2 and not k.startswith("fxprune_")
             and all(isinstance(x, (str, int, float, bool, type(None))) for x in v)]
    counts = [(c, k) for c in _configs(model.config) for k, v in vars(c).items()
              if isinstance(v, int) and not isinstance(v, bool) and v == count]
    for c, k in lists:
        value = getattr(c, k)
        setattr(c, k, type(value)(value[i] for i in kept))
    changed = []
    for c, k in counts:  # each field alone: another field of the same value must not ride along
        setattr(c, k, new)
        fresh = rebuild(model)
        setattr(c, k, count)
        try:
            length = len(fresh.get_submodule(parent)) if fresh is not None else None
        except AttributeError:
            length = None
        if length == new:
            changed.append((c, k))
    for c, k in changed:
        setattr(c, k, new)
    if not changed:
        raise FxPruneError(f"no field of {type(model.config).__name__} sets the length of {parent} ({count}): a model "
                           f"built from the config would not have {new} layers (tried "
                           f"{', '.join(k for _, k in counts) or 'no field'})")


def _rename_records(config, mapping: dict) -> None:
    """Keys of the ``fxprune_*`` records that name a module or tensor under a renamed (or removed) layer."""
    for field in [k for k in vars(config) if k.startswith("fxprune_")]:
        record = getattr(config, field)
        if not isinstance(record, dict):
            continue
        out = {}
        for key, value in record.items():
            new_key = key
            for old, new in mapping.items():
                if key == old or key.startswith(old + "."):
                    new_key = None if new is None else new + key[len(old):]
                    if isinstance(value, dict) and "layer_idx" in value and new is not None:
                        value = {**value, "layer_idx": int(new.rpartition(".")[2])} \
                            if value.get("layer_idx") is not None else value
                    break
            if new_key is not None:
                out[new_key] = value
        setattr(config, field, out)


def _drop_records(config, path: str) -> None:
    """Entries of the other ``fxprune_*`` records under a module replaced by a ZeroBranch (its tensors are gone)."""
    for field in [k for k in vars(config) if k.startswith("fxprune_") and k != ZERO_MODULES]:
        record = getattr(config, field)
        if isinstance(record, dict):
            setattr(config, field, {k: v for k, v in record.items() if not (k == path or k.startswith(path + "."))})

