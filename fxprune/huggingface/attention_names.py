"""Attention modules and their projections by attribute names: the fallback, kept in this one place.

The graph is the way to find attention: :mod:`fxprune.analysis.attention_sites` reads every attention call of the
captured graph (exported or symbolically traced; heads folded into the batch for a ``bmm`` too) and gives each
attention module's heads, kv heads and head dim, under any projection names, fused q|k|v included. Analysis-time
freezes (:func:`fxprune.huggingface.freezes.freeze_head_dims`), the config's head counts
(:func:`fxprune.huggingface.config_update.update_config`) and which modules get their head-count attributes
updated in place (:mod:`fxprune.huggingface.attributes`) all come from those sites. The names below remain for
what the graph does not say: which child of an attention module is its query (key) projection and which
attribute holds a head count or head dim, to recompute ``num_heads``, ``all_head_size``, GPT-2's
``split_size`` from the projections' widths (:mod:`fxprune.huggingface.attributes`); and where no graph is at
hand at all (:func:`fxprune.load_pretrained` resizing a model built from its config), which modules are
attention modules. transformers' ``Conv1D`` (GPT-2's transposed linear) is recognised by its class name here
too. Add no new name here: read it from the graph.

Example::

    >>> query_width(model.transformer.h[0].attn)   # GPT-2: c_attn, a Conv1D of weight (64, 192), holds q|k|v
    (64, 64)
"""

from __future__ import annotations

import torch.nn as nn


# Attribute names the transformers model families use for projections and head counts.
# GPT-2 projects with Conv1D (weight stored (in, out)); its self-attention's c_attn holds q|k|v side by side,
# its cross-attention has q_attn for q and c_attn for k|v.
QUERY = ("q_proj", "query", "q", "q_lin", "q_attn", "c_attn")
KEY = ("k_proj", "key", "k", "k_lin")
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
HEAD_COUNTS = {
    "num_heads": "q", "num_attention_heads": "q", "n_heads": "q", "n_head": "q",
    "num_key_value_heads": "k", "num_kv_heads": "k",
}
KV_FIELDS = [name for name, which in HEAD_COUNTS.items() if which == "k"]  # config fields too (Falcon: num_kv_heads)


def is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "weight"))


def _out_axis(projection: nn.Module) -> int:
    return 1 if type(projection).__name__ == "Conv1D" else 0


def out_width(projection: nn.Module) -> int:
    return projection.weight.shape[_out_axis(projection)]


def child_projection(module: nn.Module, names) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if is_projection(child):
            return child
    return None


def query_width(module: nn.Module) -> tuple[int, int]:
    """``(query width, hidden size)`` of an attention module, read from its query projection's weight.

    Example: GPT-2's ``c_attn`` Conv1D of weight (64, 192) holds q|k|v: query width 64, hidden 64.
    """
    query = child_projection(module, QUERY)
    axis = _out_axis(query)
    width, hidden = query.weight.shape[axis], query.weight.shape[1 - axis]
    if query is getattr(module, "c_attn", None) and getattr(module, "q_attn", None) is None:
        width //= 3  # fused q|k|v
    return width, hidden


def attention_modules(model: nn.Module):
    """(name, module) of every module with a head-dim attribute and a query projection."""
    for name, module in model.named_modules():
        if child_projection(module, QUERY) is not None and \
                any(isinstance(getattr(module, a, None), int) for a in HEAD_DIM):
            yield name, module
