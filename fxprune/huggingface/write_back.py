"""The pruned graph's tensors written back into the caller's module tree, by name.

Every parameter and buffer whose shape changed is replaced in the model (:func:`set_tensor`: a parameter stays
an ``nn.Parameter`` with its ``requires_grad``), then the attributes the graph alone knows are read from its
calls (a depthwise convolution's ``groups``, a GroupNorm's ``num_groups``) and those that restate a tensor's
shape are recomputed (:func:`fxprune.huggingface.attributes.update_attributes`).

Example::

    >>> write_back(model, pruned_graph, clone=False)
    >>> model.model.layers[0].mlp.up_proj.out_features      # 11008 -> 8256
    8256
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.huggingface.attributes import update_attributes


def write_back(model: nn.Module, pruned: nn.Module, clone: bool = True) -> None:
    """Copy every resized parameter and buffer of ``pruned`` into ``model`` by name, then fix attributes.

    ``clone=False`` moves the tensors instead, when ``pruned`` is thrown away afterwards.
    """
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    new = dict(pruned.named_parameters(remove_duplicate=False))
    new.update(dict(pruned.named_buffers(remove_duplicate=False)))
    for name, tensor in new.items():
        old = own.get(name)
        if old is None or old.shape == tensor.shape:
            continue
        set_tensor(model, name, tensor.detach().clone() if clone else tensor.detach())
    _conv_groups_from_graph(model, pruned)
    _norm_groups_from_graph(model, pruned)
    update_attributes(model)


def _calls_on_module_weights(model: nn.Module, pruned, op: str):
    """``(bound arguments, module)`` of every call in the rewritten graph whose aten schema name contains ``op``
    and whose ``weight`` argument belongs to a module of ``model`` (:func:`_weight_owner`)."""
    graph = getattr(pruned, "graph", None)
    for node in graph.nodes if graph is not None else ():
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or op not in schema.name:
            continue
        bound = dict(zip([a.name for a in schema.arguments], node.args)) | dict(node.kwargs)
        owner = _weight_owner(bound.get("weight"))
        if owner is None:
            continue
        try:
            yield bound, model.get_submodule(owner)
        except AttributeError:
            continue


def _conv_groups_from_graph(model: nn.Module, pruned) -> None:
    """``groups`` of every convolution module, read from the rewritten graph's convolution calls (by the name
    of their weight): shapes alone cannot tell a depthwise conv's new group count."""
    for bound, module in _calls_on_module_weights(model, pruned, "conv"):
        if isinstance(bound.get("groups"), int) and isinstance(module, nn.modules.conv._ConvNd):
            module.groups = bound["groups"]


def _weight_owner(weight) -> str | None:
    """The path of the module a call's ``weight`` argument belongs to: a parameter's owner, or, through a weight
    norm parametrization (``_weight_norm(original1, original0)``: Wav2Vec2's positional convolution), the module
    that holds ``parametrizations.weight``. None for a weight computed otherwise.

    Example: ``_weight_norm`` of ``encoder.pos_conv_embed.conv.parametrizations.weight.original0`` ->
    ``"encoder.pos_conv_embed.conv"``.
    """
    if getattr(weight, "op", None) == "call_function" and "weight_norm" in str(weight.target):
        weight = next((a for a in weight.all_input_nodes if a.op == "get_attr"), None)
    if getattr(weight, "op", None) != "get_attr":
        return None
    owner = weight.target.rpartition(".")[0]
    module, parametrized, _ = owner.partition(".parametrizations.")
    return module if parametrized else owner


def _norm_groups_from_graph(model: nn.Module, pruned) -> None:
    """``num_groups`` and ``num_channels`` of every GroupNorm module, read from the rewritten graph's group norm
    calls (by the name of their weight): Wav2Vec2's feature encoder normalises each channel on its own
    (``num_groups == num_channels``), so pruning channels prunes groups, which the weight's shape cannot tell.

    Example: a ``GroupNorm(32, 32)`` whose graph now calls ``group_norm(x, 24, weight[24], ...)`` becomes
    ``GroupNorm(24, 24)``.
    """
    for bound, module in _calls_on_module_weights(model, pruned, "group_norm"):
        groups = bound.get("num_groups", bound.get("group"))  # aten.group_norm / aten.native_group_norm
        if isinstance(groups, int) and isinstance(module, nn.GroupNorm):
            module.num_groups, module.num_channels = groups, module.weight.shape[0]


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, tensor)


def tensors_by_name(model: nn.Module) -> dict:
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out
