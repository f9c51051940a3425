"""A pruning plan that outlives the process: which units of each group were kept, as JSON.

Group ids (``G7``) come from the order in which atoms were created, so a plan
names each group by a *canonical member* instead: the alphabetically first
parameter axis the group appears in, and the group's position among that axis's
groups (an axis of a grouped conv is ``groups x channels per group``: position 0
is the conv groups, position 1 the channels). On replay every group is found
again by its key, and its unit count and parameter members must match, or
replay stops with a :class:`~fxprune.errors.PlanError` saying what differs.

The capture settings are kept too: the example inputs' shapes and dtypes (not
their values), non-tensor keyword arguments, and whether an HF model was
pruned in place. ``ignore`` is not needed: it only freezes groups, and the kept
units already say everything.

Example::

    >>> pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    >>> plan = pruned.meta["fxprune_plan"]
    >>> plan.save("plan.json")
    >>> plan.groups[0]
    GroupPlan(key=GroupKey(tensor='bn1.bias', axis=0, index=0), units=64, kept=[1, 4, ...], members=[...])
    >>> again = fxprune.replay(fxprune.PruningPlan.load("plan.json"), fresh_model)  # same weights

``attach_plan``/``plan_of``: the ``record`` pass and ``apply`` store the plan in ``gm.meta["fxprune_plan"]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fxprune.errors import PlanError
from fxprune.io.jsonvalue import SerializationError, decode_with, encode

FORMAT = "fxprune-plan"
VERSION = 1


@dataclass(frozen=True)
class GroupKey:
    """A group, named by one of its parameter axes and its position among that axis's groups."""

    tensor: str
    axis: int
    index: int = 0

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]" + (f"#{self.index}" if self.index else "")


@dataclass
class GroupPlan:
    key: GroupKey
    units: int
    kept: list[int]
    members: list[str] = field(default_factory=list)  # "name[axis]" of every parameter member, sorted

    @property
    def removed(self) -> list[int]:
        return sorted(set(range(self.units)) - set(self.kept))


@dataclass
class PruningPlan:
    """Kept units per group, plus what is needed to capture the model again."""

    groups: list[GroupPlan]
    inputs: object = None  # encoded example inputs: tensors as "dtype[shape]" specs
    kwargs: object = None  # encoded keyword inputs, same encoding
    inplace: bool = False
    model: str = ""  # class name of the pruned model, for people reading the file
    settings: dict = field(default_factory=dict)  # ratio, importance, ... (informational)

    # -- building ---------------------------------------------------------
    @classmethod
    def from_removal(cls, dg, removal: dict, *, inplace: bool = False, settings=None) -> "PruningPlan":
        """The plan of ``fxprune.apply(dg, removal)``: every prunable group with the units it keeps."""
        by_id = {g.id: g for g in dg.groups}
        removed = {}
        for group, units in removal.items():
            group = by_id[group] if isinstance(group, int) else group
            removed[group.id] = {int(u) for u in np.asarray(list(units)).ravel()}
        groups = []
        for group in dg.prunable_groups:
            kept = [u for u in range(group.units) if u not in removed.get(group.id, ())]
            groups.append(GroupPlan(group_key(dg, group), group.units, kept, parameter_members(group)))
        model = getattr(dg, "model", None)
        return cls(groups, inputs=_encode_inputs(getattr(dg, "model_inputs", None)),
                   kwargs=_encode_inputs(getattr(dg, "model_kwargs", None)), inplace=inplace,
                   model=type(model).__name__ if model is not None else "", settings=_plain(settings or {}))

    # -- using ------------------------------------------------------------
    def removal(self, dg) -> dict:
        """``{group: units to remove}`` on a fresh analysis ``dg`` of the same model; checks that it matches."""
        out, seen = {}, {}
        for entry in self.groups:
            group = find_group(dg, entry.key)
            if group.units != entry.units:
                raise PlanError(f"plan group {entry.key} has {entry.units} units but the model's has {group.units}: "
                                "the plan was made for a different architecture or width")
            members = parameter_members(group)
            if entry.members and members != entry.members:
                missing = sorted(set(entry.members) - set(members))[:3]
                extra = sorted(set(members) - set(entry.members))[:3]
                raise PlanError(f"plan group {entry.key} has different members in this model "
                                f"(only in the plan: {missing or 'none'}; only in the model: {extra or 'none'})")
            if group.id in seen:
                raise PlanError(f"plan groups {seen[group.id]} and {entry.key} are the same group in this model")
            seen[group.id] = entry.key
            if entry.removed:
                out[group] = entry.removed
        return out

    def example_inputs(self, seed: int = 0):
        """``(args, kwargs)`` with the recorded shapes and dtypes: random floats, ones for ints and bools."""
        generator = torch.Generator().manual_seed(seed)

        def make(spec: str):
            dtype, _, shape = spec.partition("[")
            shape = [int(s) for s in shape.rstrip("]").split(",") if s.strip()]
            dtype = getattr(torch, dtype)
            if dtype.is_floating_point or dtype.is_complex:
                return torch.randn(shape, generator=generator).to(dtype)
            return torch.ones(shape, dtype=dtype)

        def value(data):
            return None if data is None else decode_with(data, node=_no_node, tensor=make)

        return value(self.inputs), value(self.kwargs)

    # -- files ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "inplace": self.inplace,
                "inputs": self.inputs, "kwargs": self.kwargs, "settings": self.settings,
                "groups": [{"key": asdict(g.key), "units": g.units, "kept": g.kept, "members": g.members}
                           for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if data.get("format") != FORMAT or data.get("version", 0) > VERSION:
            raise PlanError(f"not an fxprune pruning plan of version <= {VERSION}")
        groups = [GroupPlan(GroupKey(**g["key"]), g["units"], list(g["kept"]), list(g.get("members", [])))
                  for g in data["groups"]]
        return cls(groups, inputs=data.get("inputs"), kwargs=data.get("kwargs"), inplace=data.get("inplace", False),
                   model=data.get("model", ""), settings=data.get("settings", {}))

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def __repr__(self) -> str:
        losing = sum(1 for g in self.groups if len(g.kept) < g.units)
        return f"PruningPlan({self.model or 'model'}: {len(self.groups)} groups, {losing} lose units)"


def group_key(dg, group) -> GroupKey:
    """The canonical key of a group: its alphabetically first parameter axis, and its position there."""
    candidates = sorted({(m.name, m.dim) for m in group.members if m.kind == "parameter"}) or \
        sorted({(m.name, m.dim) for m in group.members if m.kind in ("buffer", "constant")})
    if not candidates:
        raise PlanError(f"group G{group.id} has no parameter or buffer to name it by")
    name, axis = candidates[0]
    return GroupKey(name, axis, dg.groups_of(name, axis).index(group))


def find_group(dg, key: GroupKey):
    """The group a key names in ``dg``, or a PlanError that says why there is none."""
    try:
        groups = dg.groups_of(key.tensor, key.axis)
    except KeyError:
        raise PlanError(f"the model has no parameter axis {key.tensor}[{key.axis}] (named by a group of the plan); "
                        "was the plan made for another model?") from None
    if key.index >= len(groups):
        raise PlanError(f"{key.tensor}[{key.axis}] is made of {len(groups)} group(s) in this model; "
                        f"the plan refers to group #{key.index} of it")
    return groups[key.index]


def parameter_members(group) -> list[str]:
    return sorted({f"{m.name}[{m.dim}]" for m in group.members if m.kind == "parameter"})


def _encode_inputs(value):
    if value is None:
        return None
    try:
        return encode(value, "example inputs", tensor_ref=_tensor_spec)
    except SerializationError:
        return None  # inputs the plan cannot describe: replay then needs example_inputs


def _tensor_spec(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(str(int(s)) for s in t.shape)}]"


def _plain(settings: dict) -> dict:
    """The JSON-friendly part of the settings (a callable importance becomes its name)."""
    out = {}
    for key, value in settings.items():
        if callable(value):
            value = getattr(value, "__name__", repr(value))
        try:
            out[key] = encode(value, key)
        except SerializationError:
            out[key] = repr(value)
    return out


def _no_node(name):
    raise PlanError(f"unexpected reference {name!r} in a plan")


PLAN_META = "fxprune_plan"
CONFIG_PLAN = "_fxprune_plan"  # the plan in a diffusers config (saved in config.json, ignored by its loaders)


def attach_plan(result, plan: PruningPlan) -> None:
    """Keep ``plan`` on what prune/apply returned: ``gm.meta["fxprune_plan"]``, else ``model.fxprune_plan``.

    A model pruned in place whose config is registered the diffusers way (``register_to_config``) gets the plan
    in its config too, under ``"_fxprune_plan"``, so that ``save_pretrained`` writes it into ``config.json`` for
    :func:`fxprune.load_pruned` (``UNet2DModel.from_config(config)`` then takes the pruned weights). A private
    key: diffusers' loaders drop keys starting with ``_`` without a warning.
    """
    meta = getattr(result, "meta", None)
    if isinstance(meta, dict):
        meta[PLAN_META] = plan
    else:  # a model pruned in place (any nn.Module)
        object.__setattr__(result, PLAN_META, plan)
        register = getattr(result, "register_to_config", None)
        if callable(register):
            register(**{CONFIG_PLAN: plan.to_dict()})


def plan_of(pruned) -> PruningPlan:
    """The plan ``fxprune.prune`` or ``fxprune.apply`` used to make ``pruned``.

    Example::

        >>> fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=(x,))).save("plan.json")
    """
    meta = getattr(pruned, "meta", None)
    plan = meta.get(PLAN_META) if isinstance(meta, dict) else None
    plan = plan if plan is not None else getattr(pruned, "__dict__", {}).get(PLAN_META)
    if plan is None:
        depth = " (depth pruning, gm.meta['fxprune_depth'], is not recorded as a plan: save the model)" if \
            isinstance(meta, dict) and meta.get("fxprune_depth") else ""
        raise PlanError(f"{type(pruned).__name__} carries no pruning plan{depth}: only what fxprune.prune, "
                        "fxprune.apply, fxprune.replay or fxprune.load (of a pruned model) return does")
    return plan
