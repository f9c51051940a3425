"""Which config field states which width: found by rebuilding the model with one field changed, never by name.

A model that carries a ``config`` and rebuilds from it (a transformers ``PreTrainedModel``: ``cls(config)``; a
diffusers ``ModelMixin``: ``cls.from_config(dict)``; anything duck-typed like them) can be saved and reloaded by
its own library only if the config states every width. To learn what a field states, the model is rebuilt on
the meta device (:mod:`fxprune.huggingface.rebuild`) with that field changed from ``v`` to a probe value ``p``,
and every parameter axis whose size changed is matched against the dependency graph's layout of that axis: a
*term* of the layout (an atom, a product of consecutive factors, a concatenation) of size ``v`` whose
substitution by ``p`` gives the rebuilt size is an *occurrence* of the field (a term of size ``c * v`` replaced by
``c * p`` is one too, scaled by ``c``: a time embedding of 4 x the first block's channels). Where a probe
changes no shape, integer module attributes that went from ``v`` to ``p`` (GPT-2's ``num_heads`` under
``n_head``) point at their module's parameter axes, and terms of size ``v`` there are occurrences. Fields whose
value is the size of no term holding a prunable group are not probed; a probe that adds or removes tensors
(``num_hidden_layers``) is structural and ignored.

These helpers read and edit configs generically (:func:`integer_fields`, :func:`edited`, :func:`set_fields`);
:mod:`fxprune.huggingface.portable` builds on them, and so may anything else that changes a config (layer
counts for depth pruning).

Example (LLaMA, hidden 256, 8 heads of 32 over 4 kv heads, MLP 512)::

    >>> found = field_occurrences(dg, model)
    >>> [(o.tensor, o.axis, dg.describe(o.term)) for o in found[("num_attention_heads",),].occurrences][:1]
    [('model.layers.0.self_attn.q_proj.weight', 0, '(G75(4) x G104(2))')]
    >>> found[("intermediate_size",),].probe, len(found[("intermediate_size",),].occurrences)
    (256, 6)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field as dc_field
from fractions import Fraction

import torch.nn as nn

from fxprune.algebra.layout import Atom, Cat, Prod
from fxprune.huggingface.rebuild import rebuild

Field = tuple  # ("hidden_size",) or ("block_out_channels", 1): a top-level field, or an element of a list field


# -- reading and editing configs ---------------------------------------------------------------------------------
def config_of(model: nn.Module):
    """The model's config: ``model.config`` (transformers' object, diffusers' FrozenDict), or None."""
    return getattr(model, "config", None)


def _items(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    return {k: v for k, v in vars(config).items()}


def integer_fields(config) -> dict:
    """``{field: value}`` of every integer field (not bool) and every integer element of a list/tuple field.

    Example: ``{("hidden_size",): 256, ..., ("block_out_channels", 0): 32, ("block_out_channels", 1): 64}``.
    Private keys (``_name_or_path``, ``_class_name``) and nested configs are left out.
    """
    out = {}
    for key, value in _items(config).items():
        if key.startswith("_"):
            continue
        if type(value) is int:
            out[(key,)] = value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if type(item) is int:
                    out[(key, i)] = item
    return out


def read_field(config, field: Field):
    value = _items(config).get(field[0])
    return value if len(field) == 1 else value[field[1]]


def field_name(field: Field) -> str:
    """``"hidden_size"``, ``"block_out_channels[1]"``."""
    return field[0] if len(field) == 1 else f"{field[0]}[{field[1]}]"


def _top_level(config, changes: dict) -> dict:
    """``{key: new value}`` for the top-level keys ``changes`` touch (list elements folded into their list)."""
    items = _items(config)
    out = {}
    for field, value in changes.items():
        if len(field) == 1:
            out[field[0]] = value
        else:
            seq = list(out.get(field[0], items.get(field[0])))
            seq[field[1]] = value
            out[field[0]] = type(items[field[0]])(seq)
    return out


def edited(config, changes: dict):
    """A copy of ``config`` with ``changes`` (``{field: value}``) made; the original is untouched.

    A transformers config is deep-copied and its attributes set (a field it does not have, such as a
    ``head_dim`` its attention reads with ``getattr(config, "head_dim", ...)``, is added); a mapping (diffusers)
    becomes a plain dict, which ``from_config`` takes.
    """
    top = _top_level(config, changes)
    if isinstance(config, Mapping):
        return {**dict(config), **top, **_defaults_left(config, top)}
    out = copy.deepcopy(config)
    for key, value in top.items():
        setattr(out, key, value)
    return out


_DEFAULTS = "_use_default_values"  # diffusers: fields the loader takes from the class's defaults, not the file


def _defaults_left(config: Mapping, top: dict) -> dict:
    """``{"_use_default_values": [...]}`` without the fields set now (a field left there would be reloaded at
    the class's default, whatever value the config holds), or ``{}`` when the config has no such list."""
    defaults = config.get(_DEFAULTS)
    if not isinstance(defaults, (list, tuple)):
        return {}
    return {_DEFAULTS: [key for key in defaults if key not in top]}


def set_fields(model: nn.Module, changes: dict) -> dict:
    """Make ``changes`` in ``model``'s own config; returns ``{top-level key: value before}`` (absent: None).

    A transformers config is edited in place (attention modules hold a reference to it); a diffusers model's
    frozen config is replaced through its ``register_to_config``. A property computed from other fields
    (Falcon's ``head_dim``) that refuses assignment is left alone.
    """
    config = config_of(model)
    top = _top_level(config, changes)
    before = {key: _items(config).get(key) for key in top}
    if isinstance(config, Mapping):
        model.register_to_config(**top, **_defaults_left(config, top))
        return before
    for key, value in top.items():
        try:
            setattr(config, key, value)
        except AttributeError:
            pass
    return before


# -- layouts: terms and substitution ------------------------------------------------------------------------------
def terms(layout) -> list:
    """Every sub-layout whose size a field could state: the layout, its parts and factors (recursively), and
    every run of two or more consecutive factors of a product (``kv x rep`` of ``kv x rep x head_dim``)."""
    out = [layout]
    if isinstance(layout, Cat):
        for part in layout.parts:
            out.extend(terms(part))
    elif isinstance(layout, Prod):
        n = len(layout.factors)
        out.extend(Prod(layout.factors[i:j]) for i in range(n) for j in range(i + 2, n + 1) if (i, j) != (0, n))
        for factor in layout.factors:
            out.extend(terms(factor))
    return list(dict.fromkeys(out))


def size_with(layout, replaced: dict, solver) -> int:
    """The size of ``layout`` with the terms in ``replaced`` (``{term: size}``) taking those sizes."""
    if layout in replaced:
        return replaced[layout]
    if isinstance(layout, Atom):
        return layout.size(solver)
    if isinstance(layout, Cat):
        return sum(size_with(p, replaced, solver) for p in layout.parts)
    factors, total, i = layout.factors, 1, 0
    while i < len(factors):
        for j in range(len(factors), i + 1, -1):
            run = Prod(factors[i:j])
            if j - i >= 2 and run in replaced:
                total *= replaced[run]
                i = j
                break
        else:
            total *= size_with(factors[i], replaced, solver)
            i += 1
    return total


# -- occurrences ------------------------------------------------------------------------------------------------
@dataclass
class Occurrence:
    """A term of one parameter axis whose size a field states: ``size(term) = scale * field``."""

    tensor: str
    axis: int
    term: object  # a resolved layout (sub-layout of the axis)
    scale: Fraction  # size(term) / field value


@dataclass
class FieldWidths:
    """What a probe of one field (or of fields of equal value changed together) showed (module docstring)."""

    fields: tuple  # (Field, ...): one field, or several probed together (OPT's hidden_size and word_embed_proj_dim)
    value: int
    probe: int | None = None  # the probe value whose footprint was matched
    occurrences: list = dc_field(default_factory=list)
    kind: str = "none"  # "shapes" | "attributes" | "none" (no footprint) | "opaque" (a change no term explains)
    unexplained: str = ""  # for "opaque": the first axis no term explains, "q.weight[0]: 384 -> 374"


def probe_values(value: int) -> list[int]:
    """Values a field is probed at: halves and quarters first (they keep divisibility: a hidden size that must
    stay a multiple of the head count), then one, two, four and eight less."""
    out = [value // 2, value * 3 // 4, value - 1, value - 2, value - 4, value - 8]
    return [v for v in dict.fromkeys(out) if 0 < v < value]


def _shapes(model: nn.Module) -> dict:
    out = {n: tuple(t.shape) for n, t in model.named_buffers(remove_duplicate=False)}
    out.update({n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)})
    return out


def _int_attributes(model: nn.Module) -> dict:
    return {(name, attr): value for name, module in model.named_modules() for attr, value in vars(module).items()
            if type(value) is int}


def _match(layout, old: int, new: int, value: int, probe: int, solver):
    """The term set of ``layout`` (all terms of one size ``c * value``) whose substitution by ``c * probe`` gives
    ``new``, as (term, scale); terms of size ``value`` itself are tried first. None if no substitution does."""
    by_size: dict[int, list] = {}
    for term in terms(layout):
        by_size.setdefault(term.size(solver), []).append(term)
    sizes = sorted((s for s in by_size if s % value == 0), key=lambda s: (s != value, s))
    for size in sizes:
        scale = Fraction(size, value)
        target = scale * probe
        if target.denominator != 1:
            continue
        found = by_size[size]
        for chosen in [found] + ([[t] for t in found] if len(found) > 1 else []):
            if size_with(layout, {t: int(target) for t in chosen}, solver) == new:
                return [(t, scale) for t in chosen]
    return None


def _axes_of(dg, model: nn.Module | None = None) -> dict:
    """``{(tensor name, axis): layout}`` of every parameter, buffer and constant axis of the graph, also under
    every other name the model gives the same tensor (a tied ``lm_head.weight`` is ``wte.weight`` in the graph)."""
    axes = {(key[1], axis): layout for (key, axis), layout in dg.layouts.items() if key[0] == "p"}
    if model is not None:
        names: dict[int, list] = {}
        for name, tensor in [*model.named_parameters(remove_duplicate=False),
                             *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(tensor), []).append(name)
        for group in names.values():
            known = [(n, a) for n in group for (m, a) in [(n, a) for a in range(8)] if (m, a) in axes]
            for name in group:
                for known_name, axis in known:
                    axes.setdefault((name, axis), axes[(known_name, axis)])
    return axes


def _probe(dg, model, config, fields: tuple, value: int, baseline, axes) -> FieldWidths:
    result = FieldWidths(fields, value)
    base_shapes, base_attributes = baseline
    for probe in probe_values(value):
        try:
            changed_config = edited(config, {f: probe for f in fields})
        except Exception:  # a typed field refuses the value (a strict transformers config)
            continue
        fresh = rebuild(model, changed_config)
        if fresh is None:
            continue
        shapes = _shapes(fresh)
        if shapes.keys() != base_shapes.keys():
            result.kind = "structural"  # tensors added or removed: a count of layers, experts ...
            return result
        changed = {(n, a): (old[a], new[a]) for n, new in shapes.items() for old in [base_shapes[n]]
                   for a in range(len(old)) if len(old) == len(new) and old[a] != new[a]}
        changed.update({(n, -1): (base_shapes[n], new) for n, new in shapes.items()
                        if len(new) != len(base_shapes[n])})
        if not changed:
            if result.kind == "none":  # no shape changed: module attributes that restate the field
                found = _attribute_occurrences(fresh, base_attributes, value, probe, axes, dg)
                if found:
                    result.kind, result.probe, result.occurrences = "attributes", probe, found
            continue
        occurrences, unexplained = [], ""
        for (name, axis), (old, new) in changed.items():
            layout = axes.get((name, axis))
            match = _match(layout, old, new, value, probe, dg.solver) if layout is not None else None
            if match is None:
                unexplained = f"{name}[{axis}]: {old} -> {new}"
                break
            occurrences.extend(Occurrence(name, axis, term, scale) for term, scale in match)
        if not unexplained:
            result.kind, result.probe, result.occurrences = "shapes", probe, occurrences
            return result
        if result.kind == "none":
            result.kind, result.probe, result.unexplained = "opaque", probe, unexplained
    return result


def _attribute_occurrences(fresh, base_attributes: dict, value: int, probe: int, axes: dict, dg) -> list:
    """Terms of size ``value`` in the parameter axes of modules whose integer attribute went ``value -> probe``
    (their own tensors and their children's: GPT-2's ``attn.num_heads`` and ``attn.c_attn.weight``); attributes of
    the root module (Mixtral's ``num_experts_per_tok``, kept for its loss) point at no place in particular."""
    modules = {name for (name, attr), v in _int_attributes(fresh).items()
               if v == probe and base_attributes.get((name, attr)) == value and name}
    out = []
    for (tensor, axis), layout in axes.items():
        owner = tensor.rpartition(".")[0]  # the tensor's module, or a child of the module whose attribute changed:
        if owner not in modules and owner.rpartition(".")[0] not in modules:  # the root's say nothing of where
            continue
        for term in terms(layout):
            if term.size(dg.solver) == value:
                out.append(Occurrence(tensor, axis, term, Fraction(1)))
    return out


def baseline_of(model: nn.Module, config=None):
    """``(shapes, integer attributes)`` of the model rebuilt from its config, or None if it cannot be."""
    fresh = rebuild(model, config)
    return None if fresh is None else (_shapes(fresh), _int_attributes(fresh))


def fields_name(fields: tuple) -> str:
    """``"hidden_size"``, or ``"hidden_size=word_embed_proj_dim"`` for fields probed together."""
    return "=".join(field_name(f) for f in fields)


def field_occurrences(dg, model: nn.Module, config=None, fields=None) -> dict:
    """``{(field, ...): FieldWidths}`` for every integer field of ``config`` (the model's own by default) whose
    value is the size of a term that holds a prunable group (``fields``: only those). Each probe is a rebuild on
    the meta device (a tenth of a second for a 7B LLaMA). Fields of equal value whose probes each add or remove
    tensors are probed again together (OPT adds ``project_in``/``project_out`` when ``word_embed_proj_dim`` and
    ``hidden_size`` differ): a key of several fields is one width they all state."""
    config = config_of(model) if config is None else config
    baseline = baseline_of(model, config)
    if baseline is None:
        return {}
    axes = _axes_of(dg, model)
    prunable = {g.atom for g in dg.prunable_groups}
    sizes = set()
    for layout in set(axes.values()):
        for term in terms(layout):
            if set(dg.solver.final_atoms(term)) & prunable:
                sizes.add(term.size(dg.solver))
    out = {}
    for field, value in integer_fields(config).items():
        if fields is not None and field not in fields:
            continue
        if value < 2 or value not in sizes:
            continue
        out[(field,)] = _probe(dg, model, config, (field,), value, baseline, axes)
    structural: dict[int, list] = {}
    for key, widths in out.items():
        if widths.kind == "structural":
            structural.setdefault(widths.value, []).extend(key)
    for value, together in structural.items():
        if len(together) > 1:
            joint = _probe(dg, model, config, tuple(together), value, baseline, axes)
            if joint.kind in ("shapes", "attributes"):
                for field in together:
                    del out[(field,)]
                out[tuple(together)] = joint
    return out
