"""``model.config`` after pruning in place: uniform widths set, derived fields found by rebuilding, the rest recorded.

Widths uniform across layers (hidden size, heads, kv heads, head dim, expert widths) go into the config. Fields
derived from a pruned width are found by rebuilding the model from the config on the meta device
(:mod:`fxprune.huggingface.rebuild`), and module attributes that still hold a pruned width's old size where a
rebuild holds a new one follow it (:func:`_follow_rebuild`; :func:`unfollow` takes that guess back). What a
model built from the config would still get wrong is recorded in ``config.fxprune_shapes`` /
``fxprune_attributes`` / ``fxprune_buffers`` for :func:`fxprune.load_pretrained`.

Example::

    >>> update_config(model, original_shapes, dg, removal, sites)     # LLaMA, 2 of 8 heads removed everywhere
    >>> model.config.num_attention_heads
    6
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from fxprune.dotted import set_attribute
from fxprune.huggingface.attention_names import (HEAD_DIM, KEY, KV_FIELDS, attention_modules, child_projection,
                                                 out_width, query_width)
from fxprune.huggingface.config_fields import set_fields
from fxprune.huggingface.experts import expert_widths
from fxprune.huggingface.rebuild import differences
from fxprune.rewriting.inplace.tensors import parameters_and_buffers as tensors_by_name

# config fields that record what a model rebuilt from the config would get wrong (read by load_pretrained)
RECORDED = ("fxprune_shapes", "fxprune_attributes", "fxprune_buffers")


def update_config(model: nn.Module, original_shapes: dict, dg=None, removal=None, sites=None,
                  decided=frozenset(), fitted: dict | None = None) -> dict:
    """Uniform widths go into ``model.config``; what a model built from it would still get wrong is recorded.

    ``sites``: ``{attention module path: (before, after)}`` head counts read from the graphs
    (:mod:`fxprune.analysis.attention_sites`). Config fields derived from a pruned width (OPT's ``word_embed_proj_dim``
    = the hidden size, ``intermediate_size``, ``ffn_dim``) are found by rebuilding on the meta device: an integer
    field equal to a pruned width's old value takes the new one when a rebuild then differs from the model in
    fewer tensors, attributes and buffers. The rest (``config.fxprune_shapes``, ``fxprune_attributes``,
    ``fxprune_buffers``: values of unsaved tensors a rebuild recomputes differently, Gemma's ``embed_scale``)
    is read back by :func:`load_pretrained`; without a record, ``from_pretrained`` rebuilds the pruned model.
    Returns the module attributes that followed a rebuild (``{"module.attr": value before}``, see
    :func:`_follow_rebuild`), for :func:`unfollow` when the model then computes something else.

    ``fitted`` (``{field: value}``, from :func:`fxprune.huggingface.portable.fit` with ``portable=True``): the
    values the plan was made for, set last; a record left after them is a warning (the plain loader will not
    reload the model). Without it, a record warns that only :func:`fxprune.load_pretrained` reloads the model.
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    followed = {}
    values: dict[str, set] = {}
    hidden = getattr(config, "hidden_size", None)
    carrier = residual_group(dg, hidden) if dg is not None and isinstance(hidden, int) else None
    if carrier is not None:
        by_id = {g.id: g for g in dg.groups}
        removed = {by_id[g] if isinstance(g, int) else g: units for g, units in (removal or {}).items()}
        values["hidden_size"] = {hidden - len({int(u) for u in removed.get(carrier, ())})}
    # attention modules are the graph's (sites); by attribute names only where no graph was at hand
    for _, module in attention_modules(model) if sites is None else ():
        head_dim = next(getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int))
        values.setdefault("head_dim", set()).add(head_dim)
        key = child_projection(module, KEY)
        values.setdefault("num_attention_heads", set()).add(query_width(module)[0] // head_dim)
        for field in KV_FIELDS if key is not None else ():
            values.setdefault(field, set()).add(out_width(key) // head_dim)
    for _, after in (sites or {}).values():  # fused projections under any name: counts from the graph
        values.setdefault("head_dim", set()).add(after.head_dim)
        values.setdefault("num_attention_heads", set()).add(after.heads)
        for field in KV_FIELDS:
            values.setdefault(field, set()).add(after.kv_heads)
    for key, found in expert_widths(model).items():  # the experts' widths (3-d expert weights)
        values.setdefault(key, set()).update(found)
    before = {key: getattr(config, key) for key in values if hasattr(config, key)}
    for key, found in values.items():
        if len(found) == 1 and (hasattr(config, key) or key == "head_dim"):
            _set(config, key, next(iter(found)))
    if fitted:
        set_fields(model, fitted)
    for key in RECORDED:
        config.__dict__.pop(key, None)
    found = differences(model)
    if found is None:  # the class cannot be built from these values (GPT-2: n_embd must divide by n_head)
        for key, value in before.items():
            _set(config, key, value)
        for key in values.keys() - before.keys():  # head_dim added to a config that had none
            config.__dict__.pop(key, None)
        found = differences(model)
    if found is not None:
        changed = _widths_changed(model, original_shapes)
        found = _derived_fields(model, config, changed, set(values), found)
        found, followed = _follow_rebuild(model, found, changed, decided)
    if found is None:  # no rebuild at all: every resized tensor
        shapes = {name: list(t.shape) for name, t in tensors_by_name(model).items()
                  if tuple(t.shape) != original_shapes.get(name)}
        found = (shapes, {}, {})
    for key, record in zip(RECORDED, found[:3]):
        if record:
            setattr(config, key, record)
    _warn_if_recorded(model, fitted is not None)
    return followed


def _warn_if_recorded(model: nn.Module, portable: bool) -> None:
    """Say that ``save_pretrained`` will write a checkpoint only :func:`fxprune.load_pretrained` reloads."""
    config = model.config
    recorded = {key: getattr(config, key) for key in RECORDED if getattr(config, key, None)}
    if not recorded:
        return
    what = "; ".join(f"{key}: {', '.join(list(value)[:3])}{' ...' if len(value) > 3 else ''}"
                     for key, value in recorded.items())
    if portable:
        message = (f"fxprune portable=True: {type(config).__name__} could not state every pruned width after all "
                   f"({what}); save_pretrained writes these records and only fxprune.load_pretrained reloads the "
                   f"checkpoint")
    else:
        message = (f"fxprune: {type(config).__name__} cannot state the pruned widths ({what}); save_pretrained "
                   f"writes them as records, and plain from_pretrained (pipelines, vLLM, TGI ...) will not load the "
                   f"checkpoint: reload it with fxprune.load_pretrained, or prune with portable=True for a plan "
                   f"the config states")
    warnings.warn(message, stacklevel=_callers_level())


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside fxprune: the warning points at the caller's line."""
    import sys
    from pathlib import Path

    package = str(Path(__file__).resolve().parent.parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def unfollow(model: nn.Module, followed: dict) -> None:
    """Put back the attributes :func:`_follow_rebuild` changed, and record them for :func:`load_pretrained`: a
    rebuild's value was a guess (CodeGen's attention ``embed_dim`` stays 64 in its own arithmetic whatever the
    hidden size), and the model computed something else with it."""
    for key, value in followed.items():
        set_attribute(model, key, value)
    config = model.config
    config.fxprune_attributes = {**(getattr(config, "fxprune_attributes", None) or {}), **followed}


def _set(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except AttributeError:  # a property computed from other fields (Falcon's head_dim): they say it
        pass


def _widths_changed(model: nn.Module, original_shapes: dict) -> dict[int, set]:
    """``{old size: new sizes}`` over every axis of every resized tensor (64 -> {48}: the hidden size)."""
    changed: dict[int, set] = {}
    for name, tensor in tensors_by_name(model).items():
        old = original_shapes.get(name)
        if old is not None and len(old) == tensor.ndim:
            for before, after in zip(old, tensor.shape):
                if before != after:
                    changed.setdefault(before, set()).add(int(after))
    return changed


def _derived_fields(model: nn.Module, config, changed: dict, done: set, found):
    """Integer config fields equal to a pruned width's old value (``changed``: old -> new sizes) that a rebuild
    needs at a new value (OPT's ``word_embed_proj_dim``, ``ffn_dim``): each is kept only where the rebuild then
    differs from the model in less (``max_position_embeddings`` of the same value changes nothing, or more)."""
    for key, value in list(vars(config).items()):
        if key in done or key.startswith("_") or type(value) is not int or value not in changed:
            continue
        best = value
        for new in sorted(changed[value]):
            setattr(config, key, new)
            trial = differences(model)
            if trial is not None and trial.size < found.size:
                found, best = trial, new
        setattr(config, key, best)
    return found


def _follow_rebuild(model: nn.Module, found, changed: dict, decided=frozenset()):
    """Module attributes that still hold a pruned width's original size where a rebuild from the updated config
    holds one of its new sizes take it (OLMo's weightless LayerNorm's ``normalized_shape``, XGLM's
    ``embed_dim`` and its positions' ``embedding_dim``): they restate that width, which no tensor of their
    module shows (``changed``: old -> new sizes; several when widths of the same size were pruned apart: a
    hidden size and a query width both 64). Not followed: the attributes the rewritten graph ``decided``
    (:mod:`fxprune.rewriting.inplace.restated`). Returns ``found`` without those followed, and
    ``{"module.attr": value before}`` of those followed: a guess, which in-place pruning takes back
    (:func:`unfollow`) when the model then computes something else than the pruned graph."""
    def restates(mine, theirs) -> bool:
        if type(mine) is int:
            # one of the sizes that width became (a hidden size of 64 -> 48 while the query width, also 64, went
            # to 16 gives {48, 16}); a wrong pick cannot pass silently: the run check compares outputs
            return theirs in changed.get(mine, ())
        if type(mine) is tuple and len(mine) == len(theirs):
            pairs = [(a, b) for a, b in zip(mine, theirs) if a != b]
            return bool(pairs) and all(restates(a, b) for a, b in pairs)
        return False

    followed = {key for key, value in found.attributes.items()
                if key not in decided and restates(value, found.theirs[key])}
    for key in followed:
        set_attribute(model, key, found.theirs[key])
    attributes = {k: v for k, v in found.attributes.items() if k not in followed}
    return (found._replace(attributes=attributes, theirs={k: found.theirs[k] for k in attributes}),
            {k: found.attributes[k] for k in followed})


def residual_group(dg, hidden: int):
    """The group that carries the config's hidden size: of the groups with ``hidden`` units, the one that is the
    whole axis of the most parameters (the residual stream runs through embeddings, norms and every projection's
    input or output). None when no group has that size (a vision model whose stages widen, say)."""
    def whole_axes(group) -> int:
        return sum(1 for m in group.parameters if m.layout.size(dg.solver) == group.units)

    candidates = [g for g in dg.groups if g.units == hidden and g.parameters]
    return max(candidates, key=whole_axes, default=None)
