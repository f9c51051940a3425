"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

The graph is analysed through ``torch.export`` like any other; the pruned tensors
are then written back into the original module tree by name, module attributes
are updated from the new shapes and from the head counts of the rewritten graph's
attention calls (:mod:`fxprune.huggingface.attention_sites`: fused q|k|v projections under any
name), and ``model.config`` is updated where widths are uniform across layers;
config fields derived from a pruned width are found by rebuilding the model from
the config on the meta device (:mod:`fxprune.huggingface.rebuild`). Whatever a model built
from the config would still get wrong (per-layer widths; GPT-2, whose attention
width is tied to ``n_embd``; Gemma's ``embed_scale``, sqrt of the original width)
is stored in ``config.fxprune_shapes`` / ``fxprune_attributes`` / ``fxprune_buffers``,
and :func:`load_pretrained` rebuilds the model with them. If the pruned model does
not run, or computes something else than the pruned graph, the original tensors,
attributes and config are put back.

One ``head_dim`` attribute serves q, k and v in HF attention, and RoPE's
``inv_freq`` is recomputed from the config when a model is reloaded, so head
dimensions are kept whole in place (heads, kv groups, MLP units and the hidden
size are pruned).

Example::

    >>> model = LlamaForCausalLM(config).eval()
    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.generate(ids, max_new_tokens=20)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError, describe_node
from fxprune.huggingface.attention_sites import attention_sites, update_head_counts
from fxprune.huggingface.restated_sizes import attributes_from_constants
from fxprune.huggingface.rebuild import differences
from fxprune.huggingface.experts import (expert_widths, is_experts, is_router, update_expert_attributes,
                                update_expert_count, update_router_attributes)
from fxprune.algebra.layout import Cat, Prod

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


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "weight"))


def _out_axis(projection: nn.Module) -> int:
    return 1 if type(projection).__name__ == "Conv1D" else 0


def _out_width(projection: nn.Module) -> int:
    return projection.weight.shape[_out_axis(projection)]


def _child(module: nn.Module, names) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if _is_projection(child):
            return child
    return None


def _query_width(module: nn.Module) -> tuple[int, int]:
    """``(query width, hidden size)`` of an attention module, read from its query projection's weight.

    Example: GPT-2's ``c_attn`` Conv1D of weight (64, 192) holds q|k|v: query width 64, hidden 64.
    """
    query = _child(module, QUERY)
    axis = _out_axis(query)
    width, hidden = query.weight.shape[axis], query.weight.shape[1 - axis]
    if query is getattr(module, "c_attn", None) and getattr(module, "q_attn", None) is None:
        width //= 3  # fused q|k|v
    return width, hidden


def attention_modules(model: nn.Module):
    """(name, module) of every module with a head-dim attribute and a query projection."""
    for name, module in model.named_modules():
        if _child(module, QUERY) is not None and any(isinstance(getattr(module, a, None), int) for a in HEAD_DIM):
            yield name, module


def freeze_head_dims(dg, model: nn.Module) -> None:
    """Head-dim groups of every attention module keep all their units (see module docstring).

    Attention modules are those the graph calls attention in (:mod:`fxprune.huggingface.attention_sites`, fused q|k|v
    projections under any name) and those with a head-dim attribute and a query projection. The head dim is
    the trailing part of a projection's axis whose size is ``head_dim``; where the algebra did not separate
    it from the heads, the whole axis is kept.
    """
    found = {name: next(getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int))
             for name, module in attention_modules(model)}
    for path, site in attention_sites(dg.gm).items():
        found.setdefault(path, site.head_dim)
    for name, head_dim in found.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        reason = f"head dim of {name} (one head_dim attribute for q, k and v in place)"
        for child_name, child in module.named_children():
            if not _is_projection(child):
                continue
            for axis in (0, 1):
                try:
                    layout = dg.layout_of(f"{name}.{child_name}.weight", axis)
                except KeyError:
                    continue
                for part in _head_dim_parts(layout, head_dim, dg.solver):
                    for group in dg.groups_of_layout(part):
                        if reason not in group.frozen:
                            group.frozen.append(reason)


def freeze_computed_constants(dg) -> None:
    """Axes of tensors the forward computes from constants (:mod:`fxprune.rules.constants`) keep all their units.

    The pruned graph stores the kept values of such a tensor (BLOOM's ALiBi slope of each kept head), but a
    model pruned in place runs its own forward again, which recomputes the tensor from its attributes and
    config: ``_get_alibi_slopes(n_head)`` for fewer heads gives the kept heads other slopes, so the model would
    compute something else. Graph-level pruning (``inplace=False``) keeps these axes prunable.
    """
    for layout, node in dg.state.sliced_constants:
        reason = (f"computed in forward from constants (a model pruned in place recomputes it from its config, "
                  f"not the kept values; inplace=False prunes it): {describe_node(node)}")
        for group in dg.groups_of_layout(layout):
            if not group.frozen:  # positions of a static capture are frozen already (graph input)
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


def update_attributes(model: nn.Module) -> None:
    """Module attributes that restate tensor shapes, recomputed from the tensors."""
    for name, module in model.named_modules():
        try:
            _update_module(module)
        except (AttributeError, TypeError, ZeroDivisionError) as exc:
            raise FxPruneError(f"could not update the attributes of {name} ({type(module).__name__}): {exc}") from exc
    update_expert_count(model)  # after the experts modules


def _update_module(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.modules.conv._ConvNd):  # groups come from the graph (write_back)
        outer, inner = weight.shape[:2]
        if module.transposed:
            module.in_channels, module.out_channels = outer, inner * module.groups
        else:
            module.out_channels, module.in_channels = outer, inner * module.groups
    elif type(module).__name__ == "Conv1D" and weight is not None:  # transformers' transposed linear
        module.nf = weight.shape[1]
    elif is_experts(module):  # a mixture-of-experts block's 3-d expert tensors
        update_expert_attributes(module)
    elif is_router(module):
        update_router_attributes(module)
    if _child(module, QUERY) is not None:
        _update_attention(module)
    elif isinstance(getattr(module, "intermediate_size", None), int):
        linears = [c for c in module.children() if isinstance(c, nn.Linear)]
        if linears:
            module.intermediate_size = linears[0].weight.shape[0]  # children are updated after their parent


def _update_attention(module: nn.Module) -> None:
    head_dim = next((getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int)), None)
    if not head_dim:
        return
    key = _child(module, KEY)
    q_out, hidden = _query_width(module)  # read shapes: children are updated after their parent
    sizes = {"q": q_out // head_dim, "k": (_out_width(key) if key else q_out) // head_dim}
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


def update_config(model: nn.Module, original_shapes: dict, dg=None, removal=None, sites=None,
                  decided=frozenset()) -> dict:
    """Uniform widths go into ``model.config``; what a model built from it would still get wrong is recorded.

    ``sites``: ``{attention module path: (before, after)}`` head counts read from the graphs
    (:mod:`fxprune.huggingface.attention_sites`). Config fields derived from a pruned width (OPT's ``word_embed_proj_dim``
    = the hidden size, ``intermediate_size``, ``ffn_dim``) are found by rebuilding on the meta device: an integer
    field equal to a pruned width's old value takes the new one when a rebuild then differs from the model in
    fewer tensors, attributes and buffers. The rest (``config.fxprune_shapes``, ``fxprune_attributes``,
    ``fxprune_buffers``: values of unsaved tensors a rebuild recomputes differently, Gemma's ``embed_scale``)
    is read back by :func:`load_pretrained`; without a record, ``from_pretrained`` rebuilds the pruned model.
    Returns the module attributes that followed a rebuild (``{"module.attr": value before}``, see
    :func:`_follow_rebuild`), for :func:`unfollow` when the model then computes something else.
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
    for _, module in attention_modules(model):
        head_dim = next(getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int))
        values.setdefault("head_dim", set()).add(head_dim)
        key = _child(module, KEY)
        values.setdefault("num_attention_heads", set()).add(_query_width(module)[0] // head_dim)
        for field in KV_FIELDS if key is not None else ():
            values.setdefault(field, set()).add(_out_width(key) // head_dim)
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
        shapes = {name: list(t.shape) for name, t in _named_tensors(model).items()
                  if tuple(t.shape) != original_shapes.get(name)}
        found = (shapes, {}, {})
    for key, record in zip(RECORDED, found[:3]):
        if record:
            setattr(config, key, record)
    return followed


def unfollow(model: nn.Module, followed: dict) -> None:
    """Put back the attributes :func:`_follow_rebuild` changed, and record them for :func:`load_pretrained`: a
    rebuild's value was a guess (CodeGen's attention ``embed_dim`` stays 64 in its own arithmetic whatever the
    hidden size), and the model computed something else with it."""
    for key, value in followed.items():
        owner, _, attr = key.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, value)
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
    for name, tensor in _named_tensors(model).items():
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


RECORDED = ("fxprune_shapes", "fxprune_attributes", "fxprune_buffers")


def _follow_rebuild(model: nn.Module, found, changed: dict, decided=frozenset()):
    """Module attributes that still hold a pruned width's original size where a rebuild from the updated config
    holds one of its new sizes take it (OLMo's weightless LayerNorm's ``normalized_shape``, XGLM's
    ``embed_dim`` and its positions' ``embedding_dim``): they restate that width, which no tensor of their
    module shows (``changed``: old -> new sizes; several when widths of the same size were pruned apart: a
    hidden size and a query width both 64). Not followed: the attributes the rewritten graph ``decided``
    (:mod:`fxprune.huggingface.restated_sizes`). Returns ``found`` without those followed, and
    ``{"module.attr": value before}`` of those followed: a guess, which :func:`prune_in_place` takes back
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
        owner, _, attr = key.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, found.theirs[key])
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


def _named_tensors(model: nn.Module) -> dict:
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out


def check_runs(model: nn.Module, example_inputs, kwargs=None, expected=None) -> None:
    """Run the pruned model as the user will: plain forward, and ``generate`` with a cache where it exists.

    ``expected``: the pruned graph's output on the same inputs; the model's first floating-point output must
    match it (a head count left stale can still run, on empty slices, and compute something else).
    """
    kwargs = dict(kwargs or {})
    kwargs.pop("use_cache", None)
    with torch.no_grad():
        try:
            got = model(*example_inputs, **kwargs)
            if hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
                ids = example_inputs[0] if example_inputs else kwargs["input_ids"]  # keyword inputs: a dict
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                               pad_token_id=0)
        except Exception as exc:  # name the failure for the user; this is a bug in attribute updating
            raise FxPruneError(f"the model pruned in place no longer runs: {type(exc).__name__}: {exc}") from exc
    if expected is not None and not model.training:
        got, expected = _first_float(got), _first_float(expected)
        if got is not None and expected is not None and got.shape == expected.shape:
            # the same aten ops on the same weights: a stale head count moves outputs by their own size,
            # rounding by far less (sqrt(eps) of the dtype: 1e-3 in float32, 0.09 in bfloat16)
            scale = max(expected.abs().max().item(), 1.0)
            tolerance = max(1e-3, torch.finfo(expected.dtype).eps ** 0.5) * scale
            error = (got.float() - expected.float()).abs().max().item()
            if error > tolerance:
                raise FxPruneError(f"the model pruned in place computes something else than the pruned graph "
                                   f"(largest difference {error:.3g}, allowed {tolerance:.3g}): an attribute of "
                                   f"{type(model).__name__} that restates a pruned width was not updated")


def _first_float(output):
    leaves = torch.utils._pytree.tree_leaves(output)
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def prune_in_place(dg, removal: dict, rewrite, verify, run: bool = True):
    """Prune ``dg.model`` itself: rewrite a copy, verify it, write it back, update attributes and config.

    ``run=False`` skips running the result (forward and ``generate``): a model on the meta device, which
    :func:`fxprune.prune_checkpoint` resizes for its shapes and config, cannot run; its shapes are still
    verified.
    """
    model = dg.model
    original = {name: tuple(t.shape) for name, t in _named_tensors(model).items()}
    pruned = rewrite(dg, removal, inplace=False, share_tensors=True)
    verify(pruned, dg.example_inputs, dg.expected_shapes)  # propagates the new shapes into pruned's nodes
    before, after = attention_sites(dg.gm), attention_sites(pruned)
    kwargs = {k: v for k, v in (dg.model_kwargs or {}).items() if k != "use_cache"}
    expected = None
    try:  # what the model must compute once written back (the pruned graph was verified)
        if run:
            with torch.no_grad():
                expected = pruned(*(dg.model_inputs or ()), **kwargs)
    except Exception:  # a graph that takes its inputs otherwise: the model is still run, not compared
        expected = None
    saved = _snapshot(model)
    try:
        write_back(model, pruned, clone=False)  # the resized tensors are fresh copies that only `pruned` holds
        update_head_counts(model, before, after)
        decided = attributes_from_constants(model, dg.gm, pruned, {(id(m), attr): value for m, _, _, plain in saved[0]
                                                                    for attr, value in plain.items()})
        followed = update_config(model, original, dg, removal,
                                 {p: (before[p], after[p]) for p in before.keys() & after.keys()}, decided)
        if run:
            try:
                check_runs(model, dg.model_inputs, dg.model_kwargs, expected)
            except FxPruneError:
                if not followed:
                    raise
                unfollow(model, followed)  # the rebuild's values were wrong guesses for this model: its own back
                check_runs(model, dg.model_inputs, dg.model_kwargs, expected)
    except Exception as exc:  # a model that no longer runs is never left behind: put the original back
        _restore(model, saved)
        uneven = _uneven_head_counts(after)
        if uneven:  # say why: the likeliest cause, and what works instead
            raise FxPruneError(f"{exc} (the original was put back). The plan leaves attention modules with "
                               f"different head counts ({uneven}); {type(model).__name__} fails or computes "
                               f"something else with them, so its forward most likely reads a head count from "
                               f"the config all layers share rather than from each module (Phi-3, for one, "
                               f"slices q|k|v at config.num_attention_heads * head_dim). Prune heads by the same "
                               f"amount in every layer, or without inplace=True") from exc
        if isinstance(exc, FxPruneError):
            raise
        raise FxPruneError(f"pruning {type(model).__name__} in place failed while writing back its tensors, "
                           f"attributes and config (the original was put back): {type(exc).__name__}: {exc}") from exc
    return model


def _uneven_head_counts(sites: dict) -> str:
    """``"model.layers.0.self_attn: 1 heads / 1 kv heads, ..."`` when attention modules of the pruned graph
    keep different head counts, else ``""``."""
    counts = {(site.heads, site.kv_heads) for site in sites.values()}
    if len(counts) < 2:
        return ""
    return ", ".join(f"{path}: {site.heads} heads / {site.kv_heads} kv heads" for path, site in sorted(sites.items()))


_PLAIN = (int, float, bool, str, tuple, type(None))


def _snapshot(model: nn.Module) -> tuple:
    """What in-place pruning changes: tensor slots, plain attributes of every module, the config."""
    modules = [(m, dict(m._parameters), dict(m._buffers), {k: v for k, v in vars(m).items() if isinstance(v, _PLAIN)})
               for m in model.modules()]
    config = getattr(model, "config", None)
    return modules, config, copy.deepcopy(vars(config)) if config is not None else None


def _restore(model: nn.Module, saved: tuple) -> None:
    modules, config, config_state = saved
    for module, parameters, buffers, plain in modules:
        module._parameters.clear()
        module._parameters.update(parameters)
        module._buffers.clear()
        module._buffers.update(buffers)
        vars(module).update(plain)
    if config is not None:  # the same object: attention modules hold a reference to it
        vars(config).clear()
        vars(config).update(config_state)
