"""``nn.MultiheadAttention`` modules of the caller after their tensors were resized: widths set, or a module that
can hold them swapped in.

``nn.MultiheadAttention`` ties its query width, ``embed_dim`` and ``num_heads * head_dim`` together and scales
by ``1/sqrt(head_dim)``. When the pruned widths still fit it (the residual width and the heads pruned alike,
head dims kept), the caller's module keeps its identity and takes the new ``embed_dim``, ``kdim``, ``vdim``,
``num_heads``, ``head_dim``. When they do not (heads pruned apart from the residual width: SigLIP's pooling head,
open_clip's towers), the caller's module is replaced in its parent by a
:class:`~fxprune.modules.PrunedMultiheadAttention` over the same (resized) tensors, as
:mod:`~fxprune.rewriting.recompose` does in the pruned graph; the call site is unchanged (same signature).

The pruned head count and head dim are read from the rewritten graph: the module recompose put back (a
symbolically traced graph), the head shapes of a call left decomposed, the attention call the module makes
(:mod:`fxprune.analysis.attention_sites`: an exported graph), else the module's head dim as rewritten in its own
ops (:mod:`~fxprune.rewriting.inplace.restated`), else the head dim it had.

Example::

    >>> update_multihead(model, dg.gm, pruned, changed, changes)   # open_clip ViT: 4 heads of 16 -> 3, width 64 -> 48
    ['transformer.resblocks.0.attn', ...]                          # swapped: 48 wide, 3 heads of 16
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from fxprune.dotted import set_attribute
from fxprune.analysis.attention_sites import attention_sites
from fxprune.analysis.decompose import DECOMPOSED, mha_config
from fxprune.errors import FxPruneError
from fxprune.modules.attention import PrunedMultiheadAttention
from fxprune.rewriting.inplace.restated import _mapped
from fxprune.rewriting.recompose import resized_module

_WIDTHS = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "_qkv_same_embed_dim")
_PRUNED_WIDTHS = _WIDTHS + ("out_dim", "scale")


def update_multihead(model: nn.Module, graph: fx.GraphModule, pruned: fx.GraphModule, changed: dict,
                     changes: dict) -> list[str]:
    """Every ``nn.MultiheadAttention`` of ``model`` whose tensors changed (``changed``: ``{tensor name: shapes}``)
    gets the pruned widths, or is swapped (see module docstring); ``changes``: the rewritten graph's integer
    arguments per module (:func:`~fxprune.rewriting.inplace.restated.constant_changes`). Returns the paths of the
    modules swapped."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
               and any(k.startswith(f"{name}.") if name else True for k in changed)]
    if not targets:
        return []
    sites = attention_sites(pruned)
    swapped = []
    for name, module in targets:
        heads, head_dim = _pruned_heads(name, module, pruned, sites, changes.get(name, {}))
        new = resized_module(module, mha_config(module), heads, head_dim)
        if new is None:
            raise FxPruneError(f"{name} ({type(module).__name__}): its pruned tensors do not make {heads} heads of "
                               f"{head_dim} (in_proj {tuple(_in_projection(module).shape)}, out_proj "
                               f"{tuple(module.out_proj.weight.shape)})")
        if isinstance(module, PrunedMultiheadAttention):
            _copy(new, module, _PRUNED_WIDTHS)
            module.out_dim = module.out_proj.weight.shape[0]
            if type(new) is nn.MultiheadAttention:
                module.scale = None
        elif type(new) is nn.MultiheadAttention:
            _copy(new, module, _WIDTHS)
        elif type(module) is nn.MultiheadAttention and name:
            new._forward_hooks, new._forward_pre_hooks = module._forward_hooks, module._forward_pre_hooks
            set_attribute(model, name, new)
            swapped.append(name)
        else:
            raise FxPruneError(f"{name or 'the model'} ({type(module).__name__}) cannot hold its pruned widths "
                               f"(query width {new.embed_dim}, {heads} heads of {head_dim}, output "
                               f"{new.out_dim}): only nn.MultiheadAttention itself is replaced by "
                               f"fxprune.modules.PrunedMultiheadAttention")
    return swapped


def _pruned_heads(name: str, module: nn.MultiheadAttention, pruned: fx.GraphModule, sites: dict,
                  changes: dict) -> tuple[int, int]:
    """``(heads, head_dim)`` of the module's attention in the rewritten graph (see module docstring)."""
    for node in pruned.graph.nodes:
        tag = node.meta.get(DECOMPOSED)
        if tag and tag["call"]["module"] == name and tag["role"] == "q_heads":
            heads, head_dim = node.args[2]
            return int(heads), int(head_dim)
    for node in pruned.graph.find_nodes(op="call_module", target=name):
        copy = pruned.get_submodule(name)
        if isinstance(copy, nn.MultiheadAttention):
            return copy.num_heads, copy.head_dim
    if name in sites:
        return sites[name].heads, sites[name].head_dim
    head_dim = _mapped(module.head_dim, changes) or module.head_dim
    rows = _in_projection(module).shape[0] // (3 if module.in_proj_weight is not None else 1)
    return rows // head_dim, head_dim


def _in_projection(module: nn.MultiheadAttention):
    return module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight


def _copy(source: nn.Module, target: nn.Module, attributes) -> None:
    for attr in attributes:
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))
