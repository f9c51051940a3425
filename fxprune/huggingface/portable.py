"""``portable=True``: plans the model's own config can state, so that its library's plain loader reloads it.

A model pruned in place is saved with its library's ``save_pretrained``; ``from_pretrained`` then builds the
class from ``config.json`` and loads the weights into it. That works only if a model built from the updated
config has exactly the pruned shapes and computes the same thing. With ``portable=True``:

1. **Analysis** (:func:`prepare`, after ``solve``): every integer config field is probed
   (:mod:`fxprune.huggingface.config_fields`: rebuilt on the meta device with the field changed, the changed
   axes matched against the layouts) to find the terms of the graph whose size it states. Groups a field states
   in several places lose units together (:class:`fxprune.planning.ties.CountTie`): every layer's MLP group
   under ``intermediate_size``, every layer's kv heads under ``num_key_value_heads``; where one field states
   terms of different widths the tie has multipliers (GPT-2's ``n_embd`` is the hidden size and 16 x the heads
   of each layer: the hidden group loses 16 units per head). Frozen, with the reason in ``group.frozen``: groups
   no field states (per-layer widths a config of one number per model cannot hold), groups a field ties to a
   frozen width (BERT's heads: its ``hidden_size`` also states the query width, heads x 32, and the hidden size
   is the graph's output in place), and groups two fields tie inconsistently. A field the class reads but the
   config lacks (Qwen2's attention reads ``getattr(config, "head_dim", hidden // heads)``) is added when its
   attention modules carry an integer attribute equal to their head dim under the same name and a probe shows
   the class reads it: with it, the hidden size no longer drags the head dim along.
2. **Planning** (:func:`fit`, after the plan): the planners honour the ties; then the config values the plan
   needs are found (each field takes the new size of its terms) and checked by rebuilding: every tensor must
   have its planned shape, every unsaved buffer (recomputed by the loader) its current value, and the class must
   accept the config (LLaMA's ``validate`` wants ``hidden_size % num_attention_heads == 0`` even with an explicit
   ``head_dim``). Where it does not, units are given back one tie step at a time (the step that fits, else the
   one that leaves the fewest mismatches, the fewest parameters kept first) and a warning says what and why.
3. **In place**: the values go into ``model.config`` (:func:`fxprune.huggingface.config_update.update_config`),
   which then finds nothing a rebuild gets wrong: no ``fxprune_shapes`` record, ``from_pretrained`` reloads it.

Example::

    >>> fxprune.prune(llama, 0.3, example_inputs=(ids,), inplace=True, portable=True)
    >>> llama.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)     # same logits
    >>> fxprune.analyze(gpt2, (ids,), inplace=True, portable=True).count_ties
    [CountTie(G3x16, G61, G99: GPT2Config.n_embd)]
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field as dc_field
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn

from fxprune.algebra.layout import kept_indices, new_size
from fxprune.analysis.removal import kept_units
from fxprune.analysis.shapes import PlannedShapes
from fxprune.errors import FxPruneError, PlanError
from fxprune.huggingface.attention_names import HEAD_DIM, attention_modules
from fxprune.analysis.attention_sites import attention_sites
from fxprune.huggingface.config_fields import (_shapes, baseline_of, config_of, edited, field_occurrences,
                                               fields_name, probe_values)
from fxprune.huggingface.rebuild import _initialised, try_rebuild, unsaved
from fxprune.planning.ties import CountTie, check_ties

PORTABLE = "portable: "  # every reason this module freezes a group with starts so


@dataclass
class Portable:
    """What :func:`prepare` found, kept on ``dg.portable`` for :func:`fit`."""

    config: object  # the config the fields were probed on (the model's, plus the added fields)
    added: dict  # {field: value} fields added to the config (Qwen2's head_dim)
    fields: dict  # {(field, ...): config_fields.FieldWidths}
    ties: list  # [CountTie]
    name: str  # "LlamaConfig", for messages
    scalars: dict = dc_field(default_factory=dict)  # {(module, attr): float} the config derives (:func:`_scalars`)


@dataclass
class Fit:
    """The config values a plan needs (``values``, added fields included) and what had to give way (``notes``)."""

    values: dict
    notes: list = dc_field(default_factory=list)


# -- analysis -----------------------------------------------------------------------------------------------------
def prepare(dg, model: nn.Module) -> Portable:
    """Probe the config, declare ties (``dg.count_ties``) and freeze what the config cannot state; returns the
    :class:`Portable` also stored as ``dg.portable``. Raises ``ValueError`` for a model without a config it can
    be rebuilt from."""
    config = config_of(model)
    # a diffusers config is a FrozenDict: named after its model ("UNet2DModel.config")
    name = f"{type(model).__name__}.config" if isinstance(config, Mapping) or config is None else type(config).__name__
    if config is None:
        raise ValueError(f"portable=True keeps the pruned widths expressible by the model's config, but "
                         f"{type(model).__name__} has no config it is built from (a transformers PreTrainedModel, a "
                         f"diffusers ModelMixin); save it with fxprune.save_pruned and reload with fxprune.load_pruned")
    fresh, why = try_rebuild(model, config)
    if fresh is None:
        raise FxPruneError(f"portable=True: {type(model).__name__} cannot be rebuilt from its own config ({why})")
    mismatched = _shape_mismatches(_shapes(fresh), _shapes(model))
    if mismatched:
        raise FxPruneError(f"portable=True: a {type(model).__name__} built from its own config already differs from "
                           f"the model ({'; '.join(mismatched[:3])}); its config does not describe it")
    added = _read_but_absent(dg, model, config)
    probed = edited(config, added) if added else config
    fields = field_occurrences(dg, model, probed)
    ties = _ties(dg, fields, name)
    _freeze_unstated(dg, fields, name)
    ties = [t for t in ties if all(g.prunable for g in t.members)]
    dg.count_ties = ties
    dg.portable = Portable(probed, added, fields, ties, name, _scalars(model, fresh))
    return dg.portable


def _shape_mismatches(theirs: dict, mine: dict) -> list[str]:
    return [f"{n}: {mine.get(n)} in the model, {s} rebuilt" for n, s in theirs.items() if mine.get(n) != s] + \
        [f"{n}: missing from a rebuild" for n in mine.keys() - theirs.keys()]


def _read_but_absent(dg, model: nn.Module, config) -> dict:
    """Fields to add to the config so that it states widths it now derives (``{(name,): value}``):

    - a field that is None (GPT-2's ``n_inner``: the MLP is then 4 x ``n_embd``) set to the width of a prunable
      group (a whole axis) when a rebuild with it is the model itself (the class reads it: it stops deriving);
    - an integer attribute of the attention modules equal to their head dim under a name the config lacks
      (Qwen2's attention reads ``getattr(config, "head_dim", hidden // heads)``), when a rebuild with it is the
      model itself and one with another value is not.

    Then a field no longer drags a width that another states along (GPT-2's MLP would lose 64 units per head).
    A mapping config (diffusers) is left alone: ``from_config`` ignores keys its class does not take.
    """
    if isinstance(config, Mapping):
        return {}
    base = baseline_of(model, config)
    if base is None:
        return {}
    out = {}
    widths = sorted({g.units for g in dg.prunable_groups if any(
        m.layout.size(dg.solver) == g.units for m in g.parameters)}, reverse=True)
    for key, value in vars(config).items():
        if value is not None or key.startswith("_"):
            continue
        for width in widths:
            if _rebuilt_shapes(model, config, {(key,): width}) != base[0]:
                continue  # read, but this is not the width it derives
            other = _rebuilt_shapes(model, config, {(key,): max(1, width // 2)})
            if other is not None and other != base[0]:  # read as a width: it derives this one
                out[(key,)] = width
            break  # the same model whatever the value: not a width
    sites = attention_sites(dg.gm)
    modules = {path: site.head_dim for path, site in sites.items()}
    for path, module in attention_modules(model):
        modules.setdefault(path, next((getattr(module, a) for a in HEAD_DIM
                                       if isinstance(getattr(module, a, None), int)), None))
    names: dict[str, int] = {}
    for path, head_dim in modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for attr, value in vars(module).items():
            if type(value) is int and value == head_dim and not attr.startswith("_"):
                names.setdefault(attr, value)
    fields = set(vars(config))
    for attr, value in names.items():
        if attr in fields or _rebuilt_shapes(model, config, {(attr,): value}) != base[0]:
            continue
        for probe in probe_values(value)[:2]:
            shapes = _rebuilt_shapes(model, config, {(attr,): probe})
            if shapes is not None and shapes != base[0]:  # the class reads it
                out[(attr,)] = value
                break
    return out


def _rebuilt_shapes(model, config, changes: dict) -> dict | None:
    """The tensor shapes of a rebuild with ``changes``, or None if the class refuses them."""
    try:
        changed = edited(config, changes)
    except Exception:  # a typed field refuses the value (a strict transformers config)
        return None
    other = baseline_of(model, changed)
    return None if other is None else other[0]


def _groups_of_term(dg, term) -> list:
    return list(dict.fromkeys(dg.groups_of_layout(term)))


def _unit_width(dg, term, group) -> int:
    """How much ``term``'s size drops per unit ``group`` loses (the other groups of the term kept whole)."""
    kept = {group.atom: np.arange(group.units - 1)}
    return term.size(dg.solver) - new_size(term, kept, dg.solver)


def _ties(dg, fields: dict, name: str) -> list:
    """Count ties from each field's occurrences (module docstring), merged over fields; groups tied
    inconsistently or to a frozen width are frozen."""
    classes: list[dict] = []  # {group: multiplier}
    reasons: list[list[str]] = []
    for key, widths in fields.items():
        if widths.kind not in ("shapes", "attributes") or not widths.occurrences:
            continue
        where = f"{name}.{fields_name(key)}"
        single, multi, fixed = [], [], []
        for occ in widths.occurrences:
            groups = _groups_of_term(dg, occ.term)
            prunable = [g for g in groups if g.prunable]
            if not prunable:
                fixed.append((occ, groups))
            elif len(prunable) == 1:
                single.append((occ, prunable[0]))
            else:
                multi.append((occ, groups))
        if fixed and (single or multi):
            occ, groups = fixed[0]
            frozen = next((g for g in groups if g.frozen), None)
            why = f" ({frozen.frozen[0]})" if frozen is not None else ""
            for group in {g for _, g in single} | {g for _, gs in multi for g in gs if g.prunable}:
                _freeze(group, f"{PORTABLE}{where} also states {occ.tensor}[{occ.axis}], whose width cannot "
                               f"change{why}")
            continue
        ties = []
        if single and not multi:
            ratio = {}
            for occ, group in single:
                width = _unit_width(dg, occ.term, group)
                r = occ.scale / width  # units of the group per unit of the field
                if ratio.setdefault(group, r) != r:
                    ratio = None
                    break
            if ratio is None:
                for _, group in single:
                    _freeze(group, f"{PORTABLE}{where} states this width at two different scales")
                continue
            denominators = math.lcm(*(r.denominator for r in ratio.values()))
            ints = {g: int(r * denominators) for g, r in ratio.items()}
            common = math.gcd(*ints.values())
            ties.append({g: m // common for g, m in ints.items()})
        elif multi and not single:
            shapes = {tuple((g.units, g.prunable) for g in groups) for _, groups in multi}
            if len(shapes) == 1:  # the same product everywhere (kv heads x queries per kv head): position by position
                columns = zip(*(groups for _, groups in multi))
                ties.extend({g: 1 for g in dict.fromkeys(column)} for column in columns
                            if column[0].prunable)
        for tie in ties:
            _merge(classes, reasons, tie, where)
    out = []
    for members, why in zip(classes, reasons):
        if members.get("conflict"):
            for group in members:
                if group != "conflict":
                    _freeze(group, f"{PORTABLE}{' and '.join(why)} tie this width to others in different ratios")
            continue
        if len(members) > 1:
            out.append(CountTie(dict(members), ", ".join(dict.fromkeys(why))))
    return out


def _merge(classes: list, reasons: list, tie: dict, where: str) -> None:
    """Add ``tie`` to the weighted union of ``classes`` (a group in two ties scales one onto the other)."""
    touching = [i for i, c in enumerate(classes) if set(c) & set(tie)]
    merged, why = dict(tie), [where]
    for i in touching:
        other = classes[i]
        shared = next(g for g in other if g in merged)
        a, b = other[shared], merged[shared]
        scale_other, scale_merged = b // math.gcd(a, b), a // math.gcd(a, b)
        combined = {g: m * scale_merged for g, m in merged.items() if g != "conflict"}
        for g, m in other.items():
            if g == "conflict":
                combined["conflict"] = True
                continue
            m = m * scale_other
            if g in combined and combined[g] != m:
                combined["conflict"] = True
            combined[g] = m
        if merged.get("conflict"):
            combined["conflict"] = True
        merged = combined
        why = reasons[i] + why
    for i in sorted(touching, reverse=True):
        del classes[i], reasons[i]
    if not merged.get("conflict"):
        ints = [m for g, m in merged.items() if g != "conflict"]
        common = math.gcd(*ints)
        merged = {g: m // common for g, m in merged.items()}
    classes.append(merged)
    reasons.append(why)


def _freeze_unstated(dg, fields: dict, name: str) -> None:
    """Prunable groups no probed field states: a model built from the config has one value for them."""
    stated = set()
    for widths in fields.values():
        if widths.kind in ("shapes", "attributes"):
            for occ in widths.occurrences:
                stated.update(_groups_of_term(dg, occ.term))
    for group in dg.prunable_groups:
        if group not in stated:
            _freeze(group, f"{PORTABLE}no field of {name} states this width (a model built from the config would "
                           f"have the original one)")


def _freeze(group, reason: str) -> None:
    if reason not in group.frozen:
        group.frozen.append(reason)


# -- planning -------------------------------------------------------------------------------------------------------
def planned_shapes(dg, removal: dict, model: nn.Module) -> dict:
    """``{tensor name: shape}`` of every tensor of ``model`` under the plan (tied names share their shape)."""
    planned = PlannedShapes(dg, removal)
    axes_names = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        axes_names.setdefault(id(tensor), []).append(name)
    out = {}
    for names in axes_names.values():
        shape = next((planned.param(n) for n in names if planned.param(n) is not None), None)
        for n in names:
            out[n] = shape
    for name, shape in _shapes(model).items():
        if out.get(name) is None:
            out[name] = shape
    return out


def candidates(dg, portable: Portable, removal: dict) -> dict:
    """``{(field, ...): [values]}``: each probed field's value under the plan, as its terms' new sizes say
    (several when its terms disagree, the original value last)."""
    kept = kept_units(dg, removal)
    out = {}
    for key, widths in portable.fields.items():
        if widths.kind not in ("shapes", "attributes"):
            continue
        found: dict[int, int] = {}
        for occ in widths.occurrences:
            value = Fraction(new_size(occ.term, kept, dg.solver)) / occ.scale
            if value.denominator == 1 and int(value) != widths.value:
                found[int(value)] = found.get(int(value), 0) + 1
        out[key] = sorted(found, key=lambda v: -found[v]) + [widths.value]
    return out


def check(dg, portable: Portable, model: nn.Module, removal: dict, values: dict) -> tuple[list, str]:
    """The mismatches of a model built from the config with ``values`` against the plan (``[]``: it states the
    plan), and the class's error where it refuses the config."""
    fresh, why = try_rebuild(model, edited(portable.config, values))
    if fresh is None:
        return [why], why
    planned = planned_shapes(dg, removal, model)
    built = _shapes(fresh)
    out = _shape_mismatches(built, planned)
    if out:
        return out, ""
    kept = kept_units(dg, removal)
    mine = dict(model.named_buffers(remove_duplicate=False))
    mine.update(dict(model.named_parameters(remove_duplicate=False)))
    theirs = dict(fresh.named_buffers(remove_duplicate=False))
    for name in unsaved(model):  # recomputed by the loader from the config: must come out as the model has it
        value, other = mine.get(name), theirs.get(name)
        if other is None:
            other = dict(fresh.named_parameters(remove_duplicate=False)).get(name)
        if value is not None and other is not None and other.device.type == "meta" and value.device.type != "meta":
            other = _initialised(fresh, name)  # a parameter never saved (Marian's sinusoidal positions)
        if value is None or other is None or other.device.type == "meta" or value.device.type == "meta":
            continue
        value = _sliced(dg, name, value.detach().cpu(), kept)  # the kept part, where the plan resizes it
        if value is None or other.shape != value.shape or not torch.equal(other.to(value.dtype), value):
            out.append(f"{name} (not saved) would be recomputed as another value")
    theirs_modules = dict(fresh.named_modules())
    for (path, attr), value in portable.scalars.items():  # floats the class computes from the config
        other = getattr(theirs_modules.get(path), attr, None)
        if other is not None and other != value:
            out.append(f"{path + '.' if path else ''}{attr} would be {other:.6g} where the model computes with "
                       f"{value:.6g}")
    return out, ""


def _sliced(dg, name: str, value: torch.Tensor, kept: dict) -> torch.Tensor | None:
    """``value`` (a tensor of the model) with only the units the plan keeps on each axis; None where an axis it
    resizes has no layout in the graph (nothing to compare with)."""
    key = dg.state.param_key(name)
    for axis in range(value.ndim):
        layout = dg.layouts.get((key, axis))
        if layout is None:
            continue
        indices = kept_indices(layout, kept, dg.solver)
        if len(indices) != value.shape[axis]:
            value = value.index_select(axis, torch.as_tensor(indices, dtype=torch.long))
    return value


def _scalars(model: nn.Module, fresh: nn.Module) -> dict:
    """``{(module path, attribute): value}`` of float attributes a rebuild from the config computes exactly as the
    model has them (Gemma's and XGLM's ``embed_scale``, sqrt of the hidden size): config-derived scalars, which
    in-place pruning leaves as they are (the pruned graph computed with them) and a loader would recompute."""
    theirs = dict(fresh.named_modules())
    out = {}
    for path, module in model.named_modules():
        other = theirs.get(path)
        for attr, value in vars(module).items():
            if type(value) is float and other is not None and getattr(other, attr, None) == value:
                out[(path, attr)] = value
    return out


def _values_for(dg, portable: Portable, model, removal: dict, limit: int = 64):
    """The first combination of candidate values whose rebuild states the plan: ``(values, [])``; else
    ``(best values tried, its mismatches)``."""
    options = candidates(dg, portable, removal)
    varying = [(f, vs) for f, vs in options.items() if len(vs) > 1]
    fixed = {f: vs[0] for f, vs in options.items() if len(vs) == 1}
    best = None
    for combo in itertools.islice(itertools.product(*(vs for _, vs in varying)), limit):
        chosen = {**fixed, **{key: v for (key, _), v in zip(varying, combo)}}
        values = dict(portable.added)
        values.update({f: v for key, v in chosen.items() if v != portable.fields[key].value for f in key})
        problems, _ = check(dg, portable, model, removal, values)
        if not problems:
            return values, []
        if best is None or len(problems) < len(best[1]):
            best = (values, problems)
    if best is None:
        values = dict(portable.added)
        return values, check(dg, portable, model, removal, values)[0]
    return best


def fit(dg, removal: dict, scores: dict, steps: dict | None = None) -> tuple[dict, Fit]:
    """``(removal, Fit)``: the plan, with units given back where the config cannot state it, and the config
    values it needs (module docstring, step 2). Warns with the reasons when units were given back.

    Giving back: a *culprit* is a tie (or an untied group) whose whole removal, given back, leaves fewer
    mismatches; of each culprit the fewest steps that do so are found (at most :data:`SCAN` steps, then the
    whole removal), and the culprit that keeps the fewest parameters that way goes first; again until the
    config states the plan. LLaMA's hidden size 176 with 3 heads: one kv head per layer comes back (4 heads
    divide 176); Gemma's hidden size comes back whole (its unsaved ``embed_scale`` is sqrt of it).
    """
    portable, model = dg.portable, dg.model
    steps = steps or {}
    removal = {g: np.asarray(u) for g, u in removal.items() if len(u)}
    values, problems = _values_for(dg, portable, model, removal)
    notes = []
    while problems:
        classes = _classes(dg, removal, steps)
        if not classes:
            raise FxPruneError(f"portable=True: a model built from {portable.name} with no unit removed still "
                               f"differs from the model: {'; '.join(problems[:3])}")
        best = None
        for members, quantum in classes:
            found = _fewest_steps(dg, portable, model, removal, members, quantum, scores, len(problems))
            if found is None:
                continue
            key = (PlannedShapes(dg, found[0]).parameter_count(), len(found[2]))
            if best is None or key < best[0]:
                best = (key, members, found)
        if best is None:  # no single class helps: give back the cheapest one whole and look again
            members, quantum = classes[0]
            trial = _give_back(removal, members, 10 ** 9, scores)
            best = (None, members, (trial, *_values_for(dg, portable, model, trial)))
        _, members, (removal, values, next_problems) = best
        notes.append(f"{', '.join(f'G{g.id}' for g in members)} keep more units ({problems[0]})")
        problems = next_problems
    if notes:
        warnings.warn(f"fxprune portable=True: {portable.name} cannot state the plan as made; units given back: "
                      f"{'; '.join(dict.fromkeys(notes))}", stacklevel=4)
    return removal, Fit(values, notes)


SCAN = 16  # steps of one class tried one by one before giving its whole removal back


def _fewest_steps(dg, portable, model, removal, members, quantum, scores, problems: int):
    """``(removal, values, problems)`` after giving back the fewest steps of one class that leave fewer than
    ``problems`` mismatches, or None when even its whole removal does not."""
    most = max(len(removal.get(g, ())) // m for g, m in members.items())
    whole = _give_back(removal, members, most, scores)
    whole_values, whole_problems = _values_for(dg, portable, model, whole)
    if len(whole_problems) >= problems:
        return None
    for count in range(1, min(SCAN, most // quantum) + 1):
        trial = _give_back(removal, members, count * quantum, scores)
        values, left = _values_for(dg, portable, model, trial)
        if len(left) < problems:
            return trial, values, left
    return whole, whole_values, whole_problems


def _classes(dg, removal: dict, steps: dict) -> list:
    """``[(members {group: multiplier}, quantum)]``: the ties and the untied groups that lose units."""
    out, tied = [], set()
    for tie in getattr(dg, "count_ties", ()) or ():
        tied.update(tie.members)
        if any(len(removal.get(g, ())) for g in tie.members):
            out.append((tie.members, tie.quantum(steps)))
    for group, units in removal.items():
        if group not in tied and len(units):
            out.append(({group: 1}, max(1, int(steps.get(group, 1)))))
    return out


def _give_back(removal: dict, members: dict, count: int, scores: dict) -> dict:
    """``removal`` with each member of a class losing ``count * multiplier`` units fewer (the highest-scoring of
    those it removed stay)."""
    out = dict(removal)
    for group, m in members.items():
        units = np.asarray(out.get(group, ()))
        keep = max(0, len(units) - count * m)
        if keep == 0:
            out.pop(group, None)
            continue
        score = np.asarray(scores[group]) if group in scores else np.arange(group.units)
        order = units[np.argsort(score[units], kind="stable")]
        out[group] = np.sort(order[:keep])
    return out


def fit_removal(dg, removal: dict) -> Fit:
    """The config values an explicit removal (``fxprune.apply`` on a graph analysed with ``portable=True``)
    needs; ``PlanError`` naming what the config cannot state (a broken tie, a value the class refuses)."""
    by_id = {g.id: g for g in dg.groups}
    removal = {by_id[g] if isinstance(g, int) else g: np.asarray(list(u)) for g, u in removal.items() if len(u)}
    broken = check_ties(removal, dg.count_ties)
    if broken:
        raise PlanError(f"portable=True: the removal breaks count ties ({'; '.join(broken)}): "
                        f"{dg.portable.name} states these widths with one number")
    values, problems = _values_for(dg, dg.portable, dg.model, removal)
    if problems:
        raise PlanError(f"portable=True: {dg.portable.name} cannot state the removal: {'; '.join(problems[:3])}")
    return Fit(values)


def unstated(dg, model: nn.Module) -> dict:
    """After in-place pruning with ``portable=True``: ``{group: reason}`` of the groups whose removal left records
    in the config (``fxprune_shapes`` / ``fxprune_attributes`` / ``fxprune_buffers``: what a model built from
    it would get wrong), so that the plan is made again without them; empty when the config states the model.

    A recorded integer attribute that still holds a changed field's original value points at that field (T5's
    ``model_dim`` = ``d_model``, a scale of its tied output, stays 64 where the rebuild says 48); a recorded tensor
    at the groups of its resized axes; anything else at every field the plan changed.
    """
    from fxprune.huggingface.config_update import RECORDED

    config = model.config
    records = {key: getattr(config, key, None) or {} for key in RECORDED}
    if not any(records.values()):
        return {}
    portable, fit = dg.portable, dg.config_fit
    changed = {key: widths for key, widths in portable.fields.items()
               if any(fit is not None and fit.values.get(f, widths.value) != widths.value for f in key)}
    culprits: dict = {}

    def blame(keys, why: str) -> None:
        for key in keys:
            for occ in changed[key].occurrences:
                for group in _groups_of_term(dg, occ.term):
                    if group.prunable:
                        culprits.setdefault(group, f"{PORTABLE}a model built from {portable.name}."
                                                   f"{fields_name(key)}={fit.values[key[0]]} {why}")

    for name, value in records["fxprune_attributes"].items():
        keys = [key for key, widths in changed.items() if type(value) is int and widths.value == value]
        blame(keys or list(changed), f"has {name} = another value than the pruned model's {value}")
    for name in records["fxprune_buffers"]:
        blame(list(changed), f"recomputes {name} (not saved) otherwise")
    for name in records["fxprune_shapes"]:
        for axis in range(8):
            layout = dg.layouts.get((dg.state.param_key(name), axis))
            if layout is None:
                continue
            for group in dg.groups_of_layout(layout):
                if group.prunable:
                    culprits.setdefault(group, f"{PORTABLE}{name} keeps a width {portable.name} cannot state")
    return culprits
