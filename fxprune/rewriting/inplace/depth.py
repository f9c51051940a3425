"""Depth pruning in place, for any ``nn.Module``: whole layers leave their list, removed branches become zeros.

The depth-pruned graph (:func:`fxprune.rewriting.depth.remove_depth`, verified) is made the caller's own model by
the one in-place mechanism (:func:`fxprune.rewriting.inplace.write_into`), whose ``edit`` step changes the module
tree inside its transaction: the caller's forward is then compared with the pruned graph at two batch sizes (plus
the library's own runs: ``generate``), and on any failure every module, list, attribute and config field is put
back exactly.

**Layers.** A removed layer (:class:`~fxprune.analysis.branches.Layer`, an element of a ``ModuleList`` or
``Sequential`` found from the graph's module paths) leaves its list, and the kept layers are numbered again from
0, so a saved state dict has the names a model built for the new depth has. Layer indices in the modules
(``self_attn.layer_idx``, which picks the layer's slot in a key/value cache) follow: an integer attribute at the
same place in every layer whose value is the layer's position in the list is set to the new position. A layer
that is no element of such a list cannot leave the model's Python code: an error before anything changes.

**Branches.** A branch removed alone cannot leave the model's Python code either, so each module that only the
branch runs (the largest such modules: a LLaMA layer's ``input_layernorm`` and ``self_attn``, a pre-norm block's
``norm1`` and ``attn``) is replaced by a :class:`~fxprune.modules.zero.ZeroBranch` returning zeros of the shape
it returned on the example inputs (recorded with a forward hook); its parameters go.

A library layer (the Hugging Face one: :mod:`fxprune.huggingface.layers`) adds what it knows through
:class:`DepthHooks` on its :class:`~fxprune.rewriting.inplace.Extension`: the config's layer count and per-layer
lists, records of the replaced modules for reloading.

Example::

    >>> model = tests.models.BlockStack(mlps=(64, 64, 64)).eval()
    >>> fxprune.prune(model, layers=1, example_inputs=(x,), inplace=True, calibration=batches) is model
    True
    >>> len(model.blocks)
    2
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from fxprune.dotted import owner_of
from fxprune.analysis.branches import module_path
from fxprune.errors import FxPruneError
from fxprune.modules.zero import ZeroBranch
from fxprune.rewriting.depth import remove_depth
from fxprune.rewriting.inplace.mechanism import Extension, own_modules, write_into


class DepthHooks:
    """What a library adds when depth pruning changes the module tree in place; every hook does nothing here."""

    def layers_removed(self, model: nn.Module, parent: str, renamed: dict) -> None:
        """Layers of the list at ``parent`` left it or were renumbered: ``{old path: new path, or None}``."""

    def branch_replaced(self, model: nn.Module, path: str, spec: dict) -> None:
        """The module at ``path`` became ``ZeroBranch(**spec)``."""


def remove_in_place(dg, branches=(), layers=(), extension: Extension | None = None, run: bool = True) -> nn.Module:
    """Remove ``branches`` and ``layers`` of ``dg`` (analysed from ``dg.model``) from the model itself (see
    module docstring); returns the model. ``extension``: the library layer (its :class:`DepthHooks` too)."""
    from fxprune.rewriting.verify import verify

    model = dg.model
    pruned = remove_depth(dg, branches, layers, share_tensors=True)
    verify(pruned, dg.example_inputs, dg.expected_shapes)
    lists = by_list(model, layers)  # a layer outside a list fails here, before anything changes
    in_layers = {layer.name for layer in layers}
    paths = [p for b in branches if b.layer not in in_layers for p in branch_modules(dg.gm, b)]
    specs = _output_specs(model, paths, dg.model_inputs, dg.model_kwargs)
    hooks = extension if isinstance(extension, DepthHooks) else DepthHooks()
    own_modules(dg.gm, model)  # a symbolically traced graph keeps the modules it shared with the caller

    def edit(model: nn.Module) -> None:
        for path in paths:
            _replace(model, path, specs[path])
            hooks.branch_replaced(model, path, specs[path])
        for parent, names in lists.items():
            hooks.layers_removed(model, parent, _remove_layers(model, parent, names))

    return write_into(model, dg.gm, pruned, dg.model_inputs, dg.model_kwargs, extension=extension, edit=edit,
                      run=run)


def renamed_parameters(dg, layers) -> dict:
    """``{old parameter name: new name}`` of every parameter of the kept layers of each list losing ``layers``
    (names of removed layers map to None), for copying refit weights computed on the analysed names."""
    out = {}
    for parent, names in by_list(dg.model, layers).items():
        container = dg.model.get_submodule(parent)
        for key, (old, new) in zip(list(container._modules), _new_paths(parent, list(container._modules),
                                                                        names).items()):
            for pname, _ in container._modules[key].named_parameters(remove_duplicate=False):
                out[f"{old}.{pname}"] = None if new is None else f"{new}.{pname}"
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
    parent, name = owner_of(model, path)
    parent._modules[name] = ZeroBranch(spec["outputs"], spec["cache"], spec["layer_idx"])


# -- layers -----------------------------------------------------------------------------------------------------

def by_list(model: nn.Module, layers) -> dict[str, set]:
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


def _remove_layers(model: nn.Module, parent: str, names: set) -> dict:
    """The layers ``names`` out of the list at ``parent``, the rest renumbered (a ``Sequential`` with names of
    its own keeps them); ``{old path: new path, or None}`` of every layer it had."""
    container = model.get_submodule(parent)
    keys = list(container._modules)
    old = [container._modules[k] for k in keys]
    kept = [i for i, k in enumerate(keys) if _join(parent, k) not in names]
    if not kept:
        raise FxPruneError(f"removing every layer of {parent} would leave it empty")
    paths = _new_paths(parent, keys, names)
    indices = _index_attributes(old)
    container._modules.clear()
    for j, i in enumerate(kept):
        container._modules[paths[_join(parent, keys[i])].rpartition(".")[2]] = old[i]
        for rel, attr in indices:
            owner = old[i].get_submodule(rel) if rel else old[i]
            setattr(owner, attr, j)
    return paths


def _new_paths(parent: str, keys: list[str], names: set) -> dict:
    """``{old path: new path, or None}`` of the layers ``keys`` of the list at ``parent`` once ``names`` left it:
    positions numbered again from 0 (a ``Sequential`` with names of its own keeps them)."""
    positional = keys == [str(i) for i in range(len(keys))]
    kept = [k for k in keys if _join(parent, k) not in names]
    return {_join(parent, k): (None if k not in kept else _join(parent, str(kept.index(k)) if positional else k))
            for k in keys}


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key
