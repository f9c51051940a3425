"""What analysis freezes when a Hugging Face model is to be pruned in place (``inplace=True``).

The model pruned in place runs its own forward again, so axes it cannot express stay whole: head dims (one
``head_dim`` attribute serves q, k and v, and RoPE's ``inv_freq`` is recomputed from the config on reload:
:func:`freeze_head_dims`); axes of tensors the forward computes from constants freeze for any model in place
(:mod:`fxprune.rewriting.inplace.freezes`). :func:`internal_outputs` names the graph outputs that are internal
states (their width may change; the first output's may not). The ``solve`` and ``relate`` passes call these.

Example::

    >>> freeze_head_dims(dg, model)     # LLaMA: every q/k/v/o head-dim group frozen, heads stay prunable
    >>> [g.frozen[0] for g in dg.groups if g.frozen and "head dim" in g.frozen[0]][0]
    'head dim of model.layers.0.self_attn (one head_dim attribute for q, k and v in place)'
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.algebra.layout import Cat, Prod
from fxprune.analysis.attention_sites import attention_sites
from fxprune.huggingface.attention_names import is_projection


def internal_outputs(gm) -> set:
    """Names of the graph's outputs that are internal states of the model: every output after the first that
    the graph also computes with (BART's ``encoder_last_hidden_state``, which its decoder attends to). Pruned
    in place, the model is the caller's own: its first output (logits, the last hidden state) keeps its shape,
    as do outputs nothing else reads (BERT's ``pooler_output``), while the width of a state it passes from one
    part to another is what pruning changes (the hidden size), as ``output_hidden_states`` would show.

    Example: for ``BartForConditionalGeneration`` (logits, encoder_last_hidden_state) -> {"layer_norm_2"}.
    """
    out = gm.graph.find_nodes(op="output")[0]
    leaves = []
    torch.fx.node.map_arg(out.args, lambda n: leaves.append(n) or n)
    return {n.name for n in leaves[1:] if n is not leaves[0] and any(u.op != "output" for u in n.users)}


def freeze_head_dims(dg, model: nn.Module) -> None:
    """Head-dim groups of every attention module keep all their units (see module docstring).

    Found from the graph only: the groups attention contracts over (marked by the rules, ``Group.head_dim``),
    and, in each module the graph calls attention in (:mod:`fxprune.analysis.attention_sites`, fused q|k|v
    projections under any name), the trailing part of each projection's axis whose size is the call's head dim;
    where the algebra did not separate it from the heads, the whole axis is kept.
    """
    for group in dg.groups:
        if group.head_dim:
            reason = f"head dim of attention (one head_dim attribute for q, k and v in place): {group.head_dim}"
            if not any(r.startswith("head dim of attention (one") for r in group.frozen):
                group.frozen.append(reason)
    for name, site in attention_sites(dg.gm).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        reason = f"head dim of {name} (one head_dim attribute for q, k and v in place)"
        for child_name, child in module.named_children():
            if not is_projection(child):
                continue
            for axis in (0, 1):
                try:
                    layout = dg.layout_of(f"{name}.{child_name}.weight", axis)
                except KeyError:
                    continue
                for part in _head_dim_parts(layout, site.head_dim, dg.solver):
                    for group in dg.groups_of_layout(part):
                        if reason not in group.frozen:
                            group.frozen.append(reason)


def _head_dim_parts(layout, head_dim: int, solver):
    """The head-dim factor of an axis: of each segment of a fused q|k|v axis; none of a plain hidden axis."""
    if isinstance(layout, Cat):
        for part in layout.parts:
            yield from _head_dim_parts(part, head_dim, solver)
    elif isinstance(layout, Prod) or layout.size(solver) == head_dim:
        yield _trailing(layout, head_dim, solver)


def _trailing(layout, size: int, solver):
    """The trailing factors of a layout whose sizes multiply to ``size`` (the whole layout if none do)."""
    factors = layout.factors if isinstance(layout, Prod) else (layout,)
    last = factors[-1].size(solver)
    if len(factors) > 1 and last > size and last % size == 0:
        return factors[-1]  # heads x (q|k|v of one head), GPT-NeoX: every unit of the inner factor is head dim
    product = 1
    for i in range(len(factors) - 1, -1, -1):
        product *= factors[i].size(solver)
        if product == size:
            return Prod(tuple(factors[i:]))
        if product > size:
            break
    return layout
