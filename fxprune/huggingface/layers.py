"""Depth pruning in place on a Hugging Face model: whole layers leave their list, removed branches become zeros.

**Layers.** A removed layer (:class:`~fxprune.analysis.branches.Layer`, an element of a ``ModuleList`` found from
the graph's module paths) leaves its list, and the kept layers are numbered again from 0, so the saved
checkpoint has the names a model built from the updated config has. Then, all found without model names:

- the layer count in the config: every integer field (of the config or a sub-config) equal to the list's old
  length is tried at the new length, and kept where a model rebuilt from the config on the meta device
  (:func:`fxprune.huggingface.rebuild.rebuild`) has a list of the new length (``num_hidden_layers``; a field
  that happens to have the same value, ``num_attention_heads = 4`` with 4 layers, does not shorten the list);
- per-layer lists of the config (``layer_types``, any list whose length is the layer count) keep the entries of
  the kept layers;
- layer indices in the modules (``self_attn.layer_idx``, which picks the layer's slot in the key/value cache):
  an integer attribute at the same place in every layer whose value is the layer's position in the list is
  set to the layer's new position;
- what earlier in-place pruning recorded by module path (``config.fxprune_shapes`` and the other ``fxprune_*``
  records) follows the new names; entries of removed layers go.

Plain ``from_pretrained`` reloads the result.

**Branches.** A branch removed alone cannot leave the model's Python code, so each module that only the branch
runs (the largest such modules: a LLaMA layer's ``input_layernorm`` and ``self_attn``, BERT's
``attention.self`` and ``attention.output.dense``) is replaced by a :class:`~fxprune.modules.zero.ZeroBranch`
returning zeros of the shape it returned on the example inputs (recorded with a forward hook); the parameters
go. ``config.fxprune_zero_modules`` records them (``{path: {"outputs", "cache", "layer_idx"}}``) and
:func:`fxprune.load_pretrained` puts them back on reloading; plain ``from_pretrained`` would build the
replaced modules with random weights.

The model is then run as the user runs it (forward, ``generate`` with a cache) and compared with the verified
pruned graph (:func:`fxprune.huggingface.run_check.check_runs`); on any failure the modules, lists, tensors,
attributes and config are put back exactly.

Example::

    >>> fxprune.prune(model, layers=2, example_inputs=(ids,), inplace=True, calibration=batches)
    >>> model.config.num_hidden_layers, len(model.model.layers)
    (2, 2)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from fxprune.analysis.branches import module_path
from fxprune.errors import FxPruneError
from fxprune.huggingface.rebuild import rebuild
from fxprune.huggingface.run_check import check_runs
from fxprune.huggingface.snapshot import restore, snapshot
from fxprune.modules.zero import ZeroBranch

ZERO_MODULES = "fxprune_zero_modules"  # config field: {module path: ZeroBranch arguments}


def remove_in_place(dg, branches=(), layers=(), verify=None, run: bool = True):
    """Remove ``branches`` and ``layers`` of ``dg`` (analysed from ``dg.model``) from the model itself (see
    module docstring); returns the model. ``verify(graph, inputs, shapes)`` checks the pruned graph first."""
    from fxprune.rewriting.depth import remove_depth

    model = dg.model
    pruned = remove_depth(dg, branches, layers, share_tensors=True)
    if verify is not None:
        verify(pruned, dg.example_inputs, dg.expected_shapes)
    kwargs = {k: v for k, v in (dg.model_kwargs or {}).items() if k != "use_cache"}
    expected = None
    if run:
        try:
            with torch.no_grad():
                expected = pruned(*(dg.model_inputs or ()), **kwargs)
        except Exception:  # a graph that takes its inputs otherwise: the model is still run, not compared
            expected = None
    in_layers = {layer.name for layer in layers}
    kept_branches = [b for b in branches if b.layer not in in_layers]
    targets = {b.id: branch_modules(dg.gm, b) for b in kept_branches}
    specs = _output_specs(model, [p for paths in targets.values() for p in paths], dg.model_inputs, dg.model_kwargs)
    saved, structure = snapshot(model), _structure(model)
    try:
        for paths in targets.values():
            for path in paths:
                _replace(model, path, specs[path])
        for parent, names in _by_list(model, layers).items():
            _remove_layers(model, parent, names)
        if run:
            check_runs(model, dg.model_inputs, dg.model_kwargs, expected)
    except Exception as exc:  # never leave a half-pruned model: put everything back
        _restore_structure(structure)
        restore(model, saved)
        if isinstance(exc, FxPruneError):
            raise FxPruneError(f"{exc} (depth pruning in place; the original was put back)") from exc
        raise FxPruneError(f"removing layers or branches of {type(model).__name__} in place failed (the original "
                           f"was put back): {type(exc).__name__}: {exc}") from exc
    return model


def renamed(dg, layers) -> dict:
    """``{old parameter name: new name}`` of every parameter of the kept layers of each list losing ``layers``
    (names of removed layers map to None), for copying refit weights computed on the analysed names."""
    out = {}
    model = dg.model
    for parent, names in _by_list(model, layers).items():
        container = model.get_submodule(parent)
        keys = list(container._modules)
        kept = [k for k in keys if f"{parent}.{k}" not in names]
        for key in keys:
            new = str(kept.index(key)) if key in kept else None
            for pname, _ in container._modules[key].named_parameters(remove_duplicate=False):
                out[f"{parent}.{key}.{pname}"] = None if new is None else f"{parent}.{new}.{pname}"
    return out


# -- branches ---------------------------------------------------------------------------------------------------

def branch_modules(gm, branch) -> list[str]:
    """The largest modules every node of which belongs to ``branch`` (module paths, graph order)."""
    members = set(branch.nodes)
    within: dict[str, list] = {}
    for node in gm.graph.nodes:
        path = module_path(node)
        if path is None or node.op in ("get_attr", "placeholder", "output"):
            continue
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            within.setdefault(".".join(parts[:k]), []).append(node.name)
    chosen, nodes = [], {n.name: n for n in gm.graph.nodes}
    for name in branch.nodes:
        path = module_path(nodes[name]) if nodes[name].op not in ("get_attr", "placeholder") else None
        if path is None:
            continue
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if all(n in members for n in within.get(prefix, ())):
                if prefix not in chosen and not any(prefix.startswith(c + ".") for c in chosen):
                    chosen.append(prefix)
                break
    return chosen


def _output_specs(model: nn.Module, paths: list, inputs, kwargs) -> dict:
    """``{path: ZeroBranch arguments}`` from one run of the model on the example inputs, with forward hooks."""
    if not paths:
        return {}
    specs, handles = {}, []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod, args, kw, output, path=path):
            specs[path] = {"outputs": ZeroBranch.spec((*args, *kw.values()), output),
                           "cache": _cache_argument(mod), "layer_idx": _layer_index(mod)}
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*(inputs or ()), **{k: v for k, v in (kwargs or {}).items() if k != "use_cache"})
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in specs]
    if missing:
        raise FxPruneError(f"modules {missing} of the removed branches did not run on the example inputs: their "
                           "output shape is unknown")
    return specs


def _cache_argument(module: nn.Module) -> str | None:
    """The forward argument annotated as a key/value ``Cache`` (transformers' cache protocol), if any."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    for name, p in parameters.items():
        if "Cache" in str(p.annotation):
            return name
    return None


def _layer_index(module: nn.Module) -> int | None:
    """The module's cache slot: an int attribute named as a layer index, else None."""
    for name, value in vars(module).items():
        if isinstance(value, int) and not isinstance(value, bool) and "layer" in name and "idx" in name:
            return value
    return None


def _replace(model: nn.Module, path: str, spec: dict) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = ZeroBranch(spec["outputs"], spec["cache"], spec["layer_idx"])
    config = getattr(model, "config", None)
    if config is not None:
        record = dict(getattr(config, ZERO_MODULES, None) or {})
        record[path] = spec
        setattr(config, ZERO_MODULES, record)
        _drop_records(config, path)


def restore_zero_modules(model: nn.Module, config) -> None:
    """Put back the :class:`ZeroBranch` modules recorded in ``config.fxprune_zero_modules`` (``load_pretrained``
    calls this on the model it builds, before loading the checkpoint)."""
    for path, spec in (getattr(config, ZERO_MODULES, None) or {}).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        parent._modules[name] = ZeroBranch(spec["outputs"], spec.get("cache"), spec.get("layer_idx"))


# -- layers -----------------------------------------------------------------------------------------------------

def _by_list(model: nn.Module, layers) -> dict[str, set]:
    """``{path of the list: {paths of its layers to remove}}``; a layer outside an indexed list is an error."""
    out: dict[str, set] = {}
    for layer in layers:
        name = layer if isinstance(layer, str) else layer.name
        parent, _, key = name.rpartition(".")
        container = model.get_submodule(parent) if parent else model
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or key not in container._modules:
            raise FxPruneError(f"layer {name} is not an element of a ModuleList or Sequential of "
                               f"{type(model).__name__}: it cannot be removed in place (prune without inplace=True)")
        out.setdefault(parent, set()).add(name)
    return out


def _structure(model: nn.Module) -> list:
    return [(m, dict(m._modules)) for m in model.modules()]


def _restore_structure(structure: list) -> None:
    for module, children in structure:
        module._modules.clear()
        module._modules.update(children)


def _index_attributes(layers: list[nn.Module]) -> list[tuple[str, str]]:
    """``(relative module path, attribute)`` of every int attribute equal to its layer's position in the list, in
    every layer that has it (at least two)."""
    seen: dict[tuple, list] = {}
    for i, layer in enumerate(layers):
        for rel, module in layer.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, int) and not isinstance(value, bool) and not attr.startswith("_"):
                    seen.setdefault((rel, attr), []).append(value == i)
    return [key for key, hits in seen.items() if len(hits) >= 2 and all(hits) and len(layers) >= 2]


def _remove_layers(model: nn.Module, parent: str, names: set) -> None:
    container = model.get_submodule(parent)
    keys = list(container._modules)
    old = [container._modules[k] for k in keys]
    kept = [i for i, k in enumerate(keys) if f"{parent}.{k}" not in names]
    if not kept:
        raise FxPruneError(f"removing every layer of {parent} would leave it empty")
    indices = _index_attributes(old)
    container._modules.clear()
    for j, i in enumerate(kept):
        container._modules[str(j)] = old[i]
        for rel, attr in indices:
            owner = old[i].get_submodule(rel) if rel else old[i]
            setattr(owner, attr, j)
    config = getattr(model, "config", None)
    if config is not None:
        _update_config(model, parent, len(keys), kept)
        mapping = {f"{parent}.{keys[i]}": (f"{parent}.{j}" if i in kept else None) for i in range(len(keys))}
        for j, i in enumerate(kept):
            mapping[f"{parent}.{keys[i]}"] = f"{parent}.{j}"
        _rename_records(config, mapping)


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

