"""Solve: relations -> final atoms -> groups. The :class:`DependencyGraph` is the low-level API.

A group is a connected component of ``dg.graph`` (final atoms joined by
``same`` relations). Its members are the axes it appears in, each as a
(parameter, buffer or activation name, axis, layout) triple, where the layout
says how the group sits in that axis (the whole axis, a factor, a segment).

Example (the worked example of docs/ARCHITECTURE.md)::

    >>> dg = fxprune.analyze(model, (torch.randn(1, 3, 8, 8),))
    >>> [g.units for g in dg.groups_of("conv1.weight", 0)]
    [2, 4]                 # conv2's groups, then the channels inside a group
    >>> print(dg.report())  # every group: units, members, and why a frozen one is frozen

Solving makes the final atoms, ``dg.graph`` and one group per connected component (``_partition``), then the members
(``_add_members``). Where an axis of a tensor computed from a literal ``arange`` is prunable and the tensor is
shared by several consumers (ALiBi slopes), ``fxprune.analysis.untie`` gives each consumer its own copy and relate
and solve run again. A group carries ``Group.head_dim`` where attention contracts over it (marked by rules with
``r.head_dim``; frozen unless ``prune_head_dims=True``, by ``keep_head_dims``), ``Group.min_kept`` where it must
keep more than one unit (``r.keep_at_least``: top-k over a router's experts), and ``Group.structure``, ``None``
until isomorphic planning computes its signature (``fxprune.planning.isomorphic``). In-place pruning freezes more
at analysis time: tensors the model's own forward computes from constants
(``fxprune.rewriting.inplace.freezes.freeze_computed_constants``) and, on a Hugging Face model, the head dims of
every attention module (``fxprune.huggingface.freezes.freeze_head_dims``). ``frozen_reasons()`` counts the reasons groups are frozen beyond ``EXPECTED_FREEZES``
(graph inputs/outputs, kernel and vocabulary axes, ``ignore``), for the ``check`` pass's warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch.fx as fx

from fxprune.algebra.context import AnalysisState
from fxprune.algebra.layout import Atom, Cat, Prod, decode


@dataclass
class Member:
    """One axis a group appears in."""

    name: str  # "layer1.0.conv1.weight", or an activation node's name (with a tuple path)
    kind: str  # "parameter" | "buffer" | "constant" | "activation"
    dim: int
    layout: object  # resolved layout of the whole axis

    def indices(self, group: "Group", units) -> np.ndarray:
        """Flat indices of this axis that belong to the given units of ``group``."""
        units = np.asarray(list(units))
        hit = np.zeros(self.layout.size(group.solver), dtype=bool)
        for atom, coords in decode(self.layout, group.solver):
            if atom == group.atom:
                hit |= np.isin(coords, units)
        return np.nonzero(hit)[0]


@dataclass(eq=False)
class Group:
    """A set of units that must be removed together from every member axis."""

    id: int
    atom: int
    units: int
    solver: object = field(repr=False)
    members: list = field(default_factory=list)
    frozen: list = field(default_factory=list)  # reasons, each naming op and source line
    broadcast: bool = False
    normalized: bool = False  # some op normalises over it: removing even dead units changes outputs
    head_dim: str = ""  # where attention contracts over it (a per-head width), else ""
    min_kept: int = 1  # units that must stay (top-k over it needs k): plans never remove more
    min_kept_reason: str = ""
    # the group's structure signature once isomorphic pruning has computed it (planning/isomorphic.py)
    structure: tuple | None = field(default=None, repr=False)

    @property
    def has_parameters(self) -> bool:
        return any(m.kind == "parameter" for m in self.members)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.units > self.min_kept and self.has_parameters

    @property
    def parameters(self) -> list[Member]:
        return [m for m in self.members if m.kind == "parameter"]

    def __hash__(self) -> int:
        return hash((self.id, self.atom))

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else ("prunable" if self.prunable else "not prunable")
        names = ", ".join(f"{m.name}[{m.dim}]" for m in self.parameters[:3])
        return f"Group(#{self.id}, units={self.units}, {state}, {names}{', ...' if len(self.parameters) > 3 else ''})"


class DependencyGraph:
    """The result of ``fxprune.analyze``: groups over a captured, shape-propagated GraphModule."""

    def __init__(self, gm: fx.GraphModule, state: AnalysisState, example_inputs, ignore=()):
        self.gm, self.state, self.example_inputs = gm, state, example_inputs
        self.meta: dict = {}  # "times", "cpu_times": seconds per pass; "capture": analysis/dynamic.py's record
        self.solver = state.solver
        kinds = self.kinds = _tensor_kinds(gm)  # tensor name -> "parameter" | "buffer"
        frozen = self._frozen_atoms(state.freezes)
        for key, reason in ignore:
            for (k, dim), atom in state.axis_atoms.items():
                if k == key:
                    for a in self.solver.final_atoms(Atom(atom)):
                        frozen.setdefault(a, []).append(reason)
        by_atom = self._partition(frozen)
        self._add_members(by_atom, state, kinds)
        self._by_atom = by_atom
        self.groups: list[Group] = [g for g in by_atom.values() if g.members]
        # groups that must lose units in fixed proportion (planning/ties.py CountTie), declared by whoever knows
        # why (huggingface/portable.py for portable=True); every planner honours them
        self.count_ties: list = []
        self.portable = None  # huggingface.portable.Portable when analysed with portable=True
        self.config_fit = None  # huggingface.portable.Fit: the config values the plan being applied needs

    def _partition(self, frozen: dict[int, list[str]]) -> dict[int, "Group"]:
        """One empty group per connected component of the atom graph (``self.graph``), keyed by its root atom."""
        self.graph: nx.Graph = self.solver.atom_graph()
        by_atom: dict[int, Group] = {}
        for component in sorted(nx.connected_components(self.graph), key=min):
            atom = self.solver.find(next(iter(component)))
            by_atom[atom] = Group(len(by_atom), atom, self.solver.sizes[atom], self.solver,
                                  frozen=list(dict.fromkeys(frozen.get(atom, []))))
        return by_atom

    def _add_members(self, by_atom: dict[int, "Group"], state: AnalysisState, kinds: dict[str, str]) -> None:
        """Every axis as a member of the groups of its final atoms; broadcast, normalised and head-dim flags."""
        self.layouts: dict[tuple, object] = {}
        resolved: dict[int, tuple] = {}  # root atom -> (layout, final atoms): many axes share one (the hidden size)
        for (key, dim), atom in state.axis_atoms.items():
            root = self.solver.find(atom)
            if root not in resolved:
                layout = self.solver.resolve(Atom(root))
                resolved[root] = layout, self.solver.final_atoms(layout, resolved=True)
            layout, atoms = resolved[root]
            self.layouts[(key, dim)] = layout
            name = key[1] if key[0] == "p" else key[1] + "".join(f"[{i}]" for i in key[2])
            kind = kinds.get(key[1], "constant") if key[0] == "p" else "activation"
            for a in atoms:
                by_atom[a].members.append(Member(name, kind, dim, layout))
        for layout in state.broadcasts:
            for a in self.solver.final_atoms(layout):
                by_atom[a].broadcast = True
        for layout in state.normalized:
            for a in self.solver.final_atoms(layout):
                by_atom[a].normalized = True
        for layout, where in state.head_dims:
            for a in self.solver.final_atoms(layout):
                by_atom[a].head_dim = by_atom[a].head_dim or where
        for layout, count, where in state.min_kept:
            for a in self.solver.final_atoms(layout):  # a compound axis: each atom keeps count (conservative)
                if count > by_atom[a].min_kept:
                    by_atom[a].min_kept, by_atom[a].min_kept_reason = count, where
        for group in by_atom.values():
            if group.has_parameters and not any(m.kind == "activation" for m in group.members):
                group.frozen.append("appears in no activation (kernel, gate or vocabulary axis)")

    def _frozen_atoms(self, freezes) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for layout, reason in freezes:
            for a in self.solver.final_atoms(layout):
                out.setdefault(a, []).append(reason)
        return out

    def keep_head_dims(self) -> None:
        """Freeze every per-head width of attention (the default policy of ``prune`` and ``analyze``).

        Heads and kv heads stay prunable; a head's width does not, so attention keeps
        its fused kernels (flash / memory-efficient SDPA need head dims that are
        multiples of 8) and every head keeps the width its module attributes describe.
        """
        for group in self.groups:
            if group.head_dim and not group.frozen:
                group.frozen.append(f"head dim of attention, kept whole by default (prune_head_dims=True prunes it): "
                                    f"{group.head_dim}")

    # -- depth -----------------------------------------------------------
    @property
    def branches(self) -> list:
        """Residual branches ``y = x + f(x)`` of the graph, removable or not (:mod:`fxprune.analysis.branches`);
        found on first use and kept."""
        if getattr(self, "_branches", None) is None:
            from fxprune.analysis.branches import find_branches

            self._branches = find_branches(self.gm)
        return self._branches

    @property
    def layers(self) -> list:
        """Layers (elements of a list of blocks) that own residual branches, each removable whole or not."""
        if getattr(self, "_layers", None) is None:
            from fxprune.analysis.branches import find_layers

            self._layers = find_layers(self.gm, self.branches)
        return self._layers

    def depth_report(self) -> str:
        """The residual branches and layers as a table: kind, owner, parameters, removable or why not."""
        if not self.branches:
            return "residual branches: none"
        lines = [f"residual branches ({sum(b.removable for b in self.branches)} of {len(self.branches)} "
                 f"removable):", f"{'branch':>6}  {'kind':<9}  {'params':>9}  {'owner':<28} status"]
        for b in self.branches:
            status = "removable" if b.removable else f"kept: {b.reason}"
            lines.append(f"{'B' + str(b.id):>6}  {b.kind:<9}  {b.params:>9}  {(b.owner or '<root>'):<28} {status}")
        if self.layers:
            lines.append(f"layers ({sum(layer.removable for layer in self.layers)} of {len(self.layers)} "
                         "removable whole):")
            for layer in self.layers:
                status = "removable" if layer.removable else f"kept: {layer.reason}"
                ids = ",".join(f"B{b.id}" for b in layer.branches)
                lines.append(f"{'':>6}  {layer.name:<28}  {layer.params:>9} params  [{ids}]  {status}")
        return "\n".join(lines)

    # -- queries ---------------------------------------------------------
    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def layout_of(self, name: str, axis: int):
        key = ("p", name)
        if (key, axis) not in self.layouts:
            key = ("v", name, ())
        if (key, axis) not in self.layouts:
            raise KeyError(f"no tensor named {name!r} with axis {axis} in the dependency graph")
        return self.layouts[(key, axis)]

    def groups_of(self, name: str, axis: int) -> list[Group]:
        """Groups of one axis, outermost factor / first segment first."""
        return [self._by_atom[a] for a in self.solver.final_atoms(self.layout_of(name, axis))]

    def groups_of_layout(self, layout) -> list[Group]:
        return [self._by_atom[a] for a in self.solver.final_atoms(layout)]

    def group_of(self, name: str, axis: int) -> Group:
        """The single group of an axis; an axis made of several groups raises and lists them."""
        groups = self.groups_of(name, axis)
        if len(groups) != 1:
            raise ValueError(f"{name}[{axis}] is {self.describe(self.layout_of(name, axis))}; "
                             f"use groups_of() for its {len(groups)} groups")
        return groups[0]

    def describe(self, layout) -> str:
        """A layout as text: ``G3`` an atom, ``G1 x G2`` a product, ``G1 ++ G2`` a concatenation."""
        if isinstance(layout, Atom):
            return f"G{self._by_atom[layout.id].id}({self.solver.sizes[layout.id]})"
        if isinstance(layout, Cat):
            return "(" + " ++ ".join(self.describe(p) for p in layout.parts) + ")"
        if isinstance(layout, Prod):
            return "(" + " x ".join(self.describe(f) for f in layout.factors) + ")"
        return str(layout)

    def role(self, group: Group) -> str:
        """How the group sits in its parameters, from structure alone (no model-specific names).

        ``rotary pairs`` — it fills both halves of a concatenation (RoPE's rotate_half: pruning
        unit u removes dims u and u + n); ``repeated`` — an expand copies it (GQA's query heads
        per kv head); ``outer factor`` — heads, kv groups, conv groups; ``inner factor`` — head
        dims, channels per group; ``whole axis`` — channels, hidden or MLP units.
        """
        roles = set()
        for member in group.members:
            roles.add(_position(member.layout, group.atom))
        if "paired" in roles:  # a frequency buffer (RoPE's inv_freq) marks rotation pairs; else GLU halves etc.
            return "rotary pairs" if any(m.kind == "buffer" for m in group.members) else "paired segments"
        if group.broadcast:
            return "repeated"
        for name in ("outer factor", "inner factor"):
            if name in roles:
                return name
        return "whole axis"

    def report(self, limit: int = 6, depth: bool = True) -> str:
        """A readable table of every group, then the ops that had no rule, then (``depth=True``) the residual
        branches and layers (:meth:`depth_report`)."""
        lines = [f"{'group':>5}  {'units':>5}  {'status':<12}  {'role':<13} members / reason"]
        for g in self.groups:
            if not g.has_parameters:
                continue
            status = "prunable" if g.prunable else ("frozen" if g.frozen else "fixed")
            params = [f"{m.name}[{m.dim}]" + ("" if isinstance(m.layout, Atom) else f"={self.describe(m.layout)}")
                      for m in g.parameters]
            more = f" (+{len(params) - limit} more)" if len(params) > limit else ""
            lines.append(f"{'G' + str(g.id):>5}  {g.units:>5}  {status:<12}  {self.role(g):<13} "
                         f"{', '.join(params[:limit])}{more}")
            if g.frozen:
                lines.append(f"{'':>5}  {'':>5}  {'':<12}  {'':<13} why: {g.frozen[0]}")
        if self.state.unsupported:
            lines.append("ops without a rule (their axes are frozen):")
            lines.extend(f"  {where}" for _, where in self.state.unsupported)
        if depth:
            try:
                lines.append(self.depth_report())
            except Exception as exc:  # the group table must not depend on it; say why it is missing
                lines.append(f"residual branches: not analysed ({type(exc).__name__}: {exc})")
        return "\n".join(lines)

    # reasons every model has: graph inputs and outputs, kernel and vocabulary axes, the caller's ``ignore``
    EXPECTED_FREEZES = ("graph input", "graph output", "appears in no activation", "vocabulary", "convolution kernel",
                        "ignored by the caller", "head dim of")  # "head dim of": the whole-heads policy

    def frozen_reasons(self, limit: int = 3) -> tuple[int, list[str]]:
        """Groups with parameters frozen for a reason other than :attr:`EXPECTED_FREEZES`: their number, and
        the commonest reasons, most groups first, as ``"no rule for this op (12 groups), e.g. node 'numpy_T'
        (call_function numpy_T.default) at model.py:57: ..."``."""
        kinds: dict[str, list[str]] = {}
        count = 0
        for g in self.groups:
            if not (g.frozen and g.has_parameters and g.units > 1):
                continue
            reasons = [r for r in g.frozen if not r.startswith(self.EXPECTED_FREEZES)]
            count += bool(reasons)
            for kind in dict.fromkeys(r.split(": node ", 1)[0] for r in reasons):
                kinds.setdefault(kind, []).append(next(r for r in reasons if r.startswith(kind)))
        ranked = sorted(kinds.items(), key=lambda kv: -len(kv[1]))[:limit]
        return count, [f"{kind} ({len(found)} group{'s' if len(found) > 1 else ''})"
                       + (f", e.g. {found[0][len(kind) + 2:]}" if found[0] != kind else "") for kind, found in ranked]

    def __repr__(self) -> str:
        return (f"DependencyGraph({len(self.groups)} groups, {len(self.prunable_groups)} prunable, "
                f"{len(self.state.unsupported)} unsupported ops)")


def _position(layout, atom: int) -> str:
    """Where ``atom`` sits in a resolved layout: whole, paired (twice in one Cat), outer or inner factor."""
    if isinstance(layout, Atom):
        return "whole"
    if isinstance(layout, Cat):
        hits = [p for p in layout.parts if atom in _atoms(p)]
        if len(hits) > 1:
            return "paired"
        return _position(hits[0], atom) if hits else "whole"
    for i, factor in enumerate(layout.factors):
        if atom in _atoms(factor):
            inner = _position(factor, atom)
            if inner == "paired":
                return inner
            return "inner factor" if i == len(layout.factors) - 1 else "outer factor"
    return "whole"


def _atoms(layout) -> set[int]:
    if isinstance(layout, Atom):
        return {layout.id}
    children = layout.parts if isinstance(layout, Cat) else layout.factors
    return set().union(*(_atoms(c) for c in children)) if children else set()


def _tensor_kinds(gm: fx.GraphModule) -> dict[str, str]:
    kinds = {name: "buffer" for name, _ in gm.named_buffers(remove_duplicate=False)}
    kinds.update({name: "parameter" for name, _ in gm.named_parameters(remove_duplicate=False)})
    return kinds
