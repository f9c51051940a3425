"""Attributes of ``torch.nn`` modules that restate their tensors' widths, recomputed after the tensors changed.

A torch module's forward reads its widths from attributes (``F.layer_norm(x, self.normalized_shape, ...)``,
``F.group_norm(x, self.num_groups, ...)``), so they must follow its new tensors. Each class below states which
attributes it owns; they are set from the tensors (``in_features``, ``num_features``, ``normalized_shape`` of a
``LayerNorm`` subclass too ...) or, where a shape cannot tell, from the rewritten graph's call on the module's
weight (a depthwise convolution's ``groups``, a ``GroupNorm``'s ``num_groups``) or from the rewritten graph's own
copy of the module (a symbolically traced graph calls copies of the caller's torch modules, and rewriting
resized their attributes: ``nn.Unflatten``'s ``unflattened_size``). ``nn.MultiheadAttention`` is
:mod:`~fxprune.rewriting.inplace.multihead`'s.

Example::

    >>> update_torch_modules(model, pruned)          # after write_tensors
    >>> model.blocks[0].norm1.normalized_shape, model.blocks[0].mlp.fc1.out_features
    ((144,), 432)
"""

from __future__ import annotations

import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.modules.attention import PrunedMultiheadAttention

# the attributes in-place pruning sets from a torch module's tensors or from the graph: never followed by value
OWNED = {
    nn.Linear: ("in_features", "out_features"),
    nn.Bilinear: ("in1_features", "in2_features", "out_features"),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
    nn.EmbeddingBag: ("num_embeddings", "embedding_dim"),
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.modules.batchnorm._NormBase: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
    nn.RMSNorm: ("normalized_shape",),
    nn.PReLU: ("num_parameters",),
    nn.RNNBase: ("input_size", "hidden_size", "proj_size"),
    nn.MultiheadAttention: ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "_qkv_same_embed_dim"),
    PrunedMultiheadAttention: ("out_dim",),
}


def owned(module: nn.Module) -> tuple:
    """The attributes of ``module`` that its torch class owns (see ``OWNED``), else ``()``."""
    return tuple(a for cls, attrs in OWNED.items() if isinstance(module, cls) for a in attrs)


def update_torch_modules(model: nn.Module, pruned: nn.Module) -> None:
    """Every torch module of ``model`` gets the widths of its tensors (see module docstring)."""
    copies = dict(pruned.named_modules())
    _groups_from_graph(model, pruned)
    for name, module in model.named_modules():
        copy = copies.get(name)
        if copy is not None and copy is not module and type(copy) is type(module):
            _copy_resized(module, copy)
        try:
            update_widths(module)
        except (AttributeError, TypeError, IndexError, ZeroDivisionError) as exc:
            raise FxPruneError(f"could not update the widths of {name or 'the model'} "
                               f"({type(module).__name__}): {exc}") from exc


def _copy_resized(module: nn.Module, copy: nn.Module) -> None:
    """The owned attributes the rewritten graph's copy of a torch module holds at other values."""
    for attr in owned(module) + _LEAF_ONLY.get(type(module), ()):
        mine, theirs = getattr(module, attr, None), getattr(copy, attr, None)
        if mine != theirs and type(mine) is type(theirs):
            setattr(module, attr, theirs)


_LEAF_ONLY = {nn.Unflatten: ("unflattened_size",)}  # widths no tensor holds: only the graph's copy knows them


def update_widths(module: nn.Module) -> None:
    """The owned widths of one torch module, from its tensors (``groups`` as it is: the graph sets it)."""
    if isinstance(module, nn.MultiheadAttention) or not owned(module):
        return  # multihead.py; not a torch module with widths
    weight = getattr(module, "weight", None)  # a weight-norm parametrization computes it
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Bilinear):
        module.out_features, module.in1_features, module.in2_features = weight.shape
    elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        outer, inner = weight.shape[:2]
        if module.transposed:
            module.in_channels, module.out_channels = outer, inner * module.groups
        else:
            module.out_channels, module.in_channels = outer, inner * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = weight if weight is not None else module._buffers.get("running_mean")
        if source is not None:
            module.num_features = source.shape[0]
    elif isinstance(module, nn.GroupNorm):
        if weight is not None:
            module.num_channels = weight.shape[0]
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if weight is not None:
            module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = weight.numel()
    elif isinstance(module, nn.RNNBase):
        _rnn_sizes(module)


def _rnn_sizes(module: nn.RNNBase) -> None:
    """``input_size``, ``hidden_size`` and ``proj_size`` of an RNN/LSTM/GRU from its layer-0 weights."""
    w_ih, w_hh = module._parameters["weight_ih_l0"], module._parameters["weight_hh_l0"]
    module.input_size = w_ih.shape[1]
    if getattr(module, "proj_size", 0):
        module.proj_size = w_hh.shape[1]
        module.hidden_size = module._parameters["weight_hr_l0"].shape[1]
    else:
        module.hidden_size = w_hh.shape[1]


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


def _groups_from_graph(model: nn.Module, pruned) -> None:
    """``groups`` of every convolution and ``num_groups`` of every GroupNorm, read from the rewritten graph's
    aten calls on their weights: shapes alone cannot tell a depthwise conv's new group count, nor a GroupNorm's
    that normalises each channel on its own (Wav2Vec2's feature encoder: ``GroupNorm(32, 32)`` whose graph now
    calls ``group_norm(x, 24, weight[24], ...)`` becomes ``GroupNorm(24, 24)``)."""
    for bound, module in _calls_on_module_weights(model, pruned, "conv"):
        if isinstance(bound.get("groups"), int) and isinstance(module, nn.modules.conv._ConvNd):
            module.groups = bound["groups"]
    for bound, module in _calls_on_module_weights(model, pruned, "group_norm"):
        groups = bound.get("num_groups", bound.get("group"))  # aten.group_norm / aten.native_group_norm
        if isinstance(groups, int) and isinstance(module, nn.GroupNorm):
            module.num_groups = groups


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
