"""Attributes of transformers modules that restate tensor shapes, recomputed from the written-back tensors.

Torch modules' widths are the generic step's (:mod:`fxprune.rewriting.inplace.torch_modules`, run here too, for
:func:`fxprune.load_pretrained`, which resizes a model built from its config without a graph). On top:
transformers' ``Conv1D.nf``, mixture-of-experts counts and widths (:mod:`~fxprune.huggingface.experts`), an
MLP's ``intermediate_size``, and an attention module's head counts, ``all_head_size``, ``split_size``,
``hidden_size``/``embed_dim`` (from its projections' widths and its head dim). Which modules are attention
modules is read from the graph (``sites``: :mod:`fxprune.analysis.attention_sites`); which of their attributes
and children are head counts and projections, from the attribute-name fallback
(:mod:`~fxprune.huggingface.attention_names`), which alone decides where no graph is at hand (loading).

Example::

    >>> update_attributes(model, sites)     # BERT, after query/key/value lost 2 of 12 heads of 64
    >>> model.bert.encoder.layer[0].attention.self.num_attention_heads
    10
"""

from __future__ import annotations

import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.huggingface.attention_names import (HEAD_COUNTS, HEAD_DIM, KEY, QUERY, child_projection, out_width,
                                                 query_width)
from fxprune.huggingface.experts import (is_experts, is_router, update_expert_attributes, update_expert_count,
                                         update_router_attributes)
from fxprune.rewriting.inplace.torch_modules import update_widths


def update_attributes(model: nn.Module, sites=None) -> None:
    """Module attributes that restate tensor shapes, recomputed from the tensors. ``sites``: paths of the
    attention modules the graph found (None: every module with a query projection by name, the fallback)."""
    for name, module in model.named_modules():
        try:
            update_widths(module)
            _update_module(module, sites is None or name in sites)
        except (AttributeError, TypeError, ZeroDivisionError) as exc:
            raise FxPruneError(f"could not update the attributes of {name} ({type(module).__name__}): {exc}") from exc
    update_expert_count(model)  # after the experts modules


def _update_module(module: nn.Module, attention: bool) -> None:
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # transformers' transposed linear
        module.nf = weight.shape[1]
    elif is_experts(module):  # a mixture-of-experts block's 3-d expert tensors
        update_expert_attributes(module)
    elif is_router(module):
        update_router_attributes(module)
    if attention and child_projection(module, QUERY) is not None:
        _update_attention(module)
    elif isinstance(getattr(module, "intermediate_size", None), int):
        linears = [c for c in module.children() if isinstance(c, nn.Linear)]
        if linears:
            module.intermediate_size = linears[0].weight.shape[0]  # children are updated after their parent


def _update_attention(module: nn.Module) -> None:
    head_dim = next((getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int)), None)
    if not head_dim:
        return
    key = child_projection(module, KEY)
    q_out, hidden = query_width(module)  # read shapes: children are updated after their parent
    sizes = {"q": q_out // head_dim, "k": (out_width(key) if key else q_out) // head_dim}
    for attr, which in HEAD_COUNTS.items():
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, sizes[which])
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = sizes["q"] // sizes["k"]
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = q_out
    if isinstance(getattr(module, "split_size", None), int):  # GPT-2 splits c_attn's output by it
        module.split_size = q_out
    for attr in ("hidden_size", "embed_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, hidden)
