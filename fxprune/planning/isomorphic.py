"""Isomorphic pruning: rank units globally, but only among groups of the same structure.

Global pruning pools the scores of every group, yet scores of structurally different
groups are not comparable: an attention head's score sums the slices of four weight
matrices, an MLP unit's two, a residual channel's dozens; a wide layer's units are spread
thinner than a narrow one's. Pooled, one kind of group can absorb the whole budget.
Isomorphic pruning (Fang et al., "Isomorphic Pruning for Vision Models", ECCV 2024) splits the
prunable groups into *isomorphic classes* — groups whose dependency subgraphs have the same
structure — and ranks units globally within each class only: every class loses ``ratio`` of
its units, taken where its scores are lowest among all of its groups.

Two groups are isomorphic when their :func:`signature` is equal: the group's unit count,
its role (:meth:`~fxprune.analysis.depgraph.DependencyGraph.role`) and flags (normalised over,
a head dim, broadcast), then for every member axis, in the order relate met them (graph
order, so the pattern of a block repeats), its kind (parameter, buffer, activation), axis,
the tensor's shape, where the group sits in the axis (its layout with the group's atom as
``"*"`` and every other atom as its size: ``("x", 3, "*", 8)`` for the heads of a fused
q|k|v weight) and the ops that use it (a parameter: each reading op and the argument it
fills, or the module class and attribute for a module call; an activation: the op that
produced it). Names and layer indices never enter, so layer 1's heads and layer 7's
heads are one class, while a layer with a wider MLP is a class of its own. The signature is
kept on the group as :attr:`fxprune.analysis.depgraph.Group.structure`.

Within a class, :func:`fxprune.planning.selection.global_plan` ranks, as for plain global pruning: each
group's scores divided by their mean, at most ``max_ratio`` of a group, removals in whole alignment
steps (so a class of aligned groups may lose up to a step less or more than its exact share).
With ``target_macs``/``target_params`` the bisection of :mod:`fxprune.planning.target` searches the one
ratio every class loses, by count: units of one class cost the same, and trading MACs across classes by
cost is just what isomorphic pruning declines to do (when the bisection cannot land on the target, its last
walk between the two bracketing plans moves groups one at a time, so classes may then differ by a step).
``isomorphic=True`` needs ``global_pruning=True`` (without it every group loses the ratio anyway: a
``ValueError`` says so) and does not combine with ``target_latency``.

Measured (``benchmarks/isomorphic_minilm.py``, the real all-MiniLM-L6-v2, heads and MLP units, hidden
kept, no refit): at 85% and 70% of the parameters the mean cosine of the sentence embeddings to the
original's is 0.69 and 0.45 with L2 scores (uniform 0.68 and 0.42, global by cost 0.53 and 0.35, which
cuts every layer to 2 of 12 heads), 0.78 and 0.55 with activation scores (uniform 0.76 and 0.50, global
0.62 and 0.49); nearest-neighbour agreement is about 0.02 below uniform's at 85% and 0.03 above it at 70%.

Example: a stack of three transformer blocks of width 32, 4 heads, MLPs of 64, 64 and 128 units
(``tests.models.BlockStack``). The classes are the residual stream, the three head groups, the two
64-unit MLP groups and the 128-unit MLP group; at ``ratio=0.5`` the residual stream loses 16 of its 32
channels, the heads 6 of their 12 wherever their scores are lowest (1, 2 and 3 heads of the three
layers when that many are dead there), the 64-unit MLPs 64 of their 128 (e.g. 40 in one and 24 in the
other), the wide MLP 64 (``tests/test_isomorphic.py``)::

    >>> classes = isomorphic_classes(dg, dg.prunable_groups)
    >>> [[g.units for g in c] for c in classes]
    [[32], [4, 4, 4], [64, 64], [128]]
    >>> removal = isomorphic_plan(groups, scores, 0.5, class_ids(dg, groups))
    >>> pruned = fxprune.prune(model, 0.5, example_inputs=(x,), global_pruning=True, isomorphic=True)
"""

from __future__ import annotations

from fxprune.algebra.layout import Atom, Cat, Prod
from fxprune.planning.selection import global_plan, local_plan


def signature(dg, group, graph: _GraphFacts | None = None) -> tuple:
    """The structure of ``group`` as a hashable tuple, equal for isomorphic groups (see the module docstring).

    Also stored as ``group.structure``. ``graph`` (what :func:`isomorphic_classes` reads off ``dg.gm`` once)
    saves reading it again per group.

    Example::

        >>> mlp0, mlp1 = (dg.group_of(f"blocks.{i}.mlp.0.weight", 0) for i in (0, 1))
        >>> signature(dg, mlp0) == signature(dg, mlp1) == mlp0.structure
        True
    """
    graph = _GraphFacts(dg.gm) if graph is None else graph
    members = []
    for member in group.members:
        pattern = _pattern(member.layout, group.atom, dg.solver)
        if member.kind == "activation":
            name, _, path = member.name.partition("[")
            node = graph.nodes.get(name)
            members.append(("activation", member.dim, _activation_shape(node, path), pattern,
                            _op_kind(node, graph.modules) if node is not None else "?"))
        else:
            members.append((member.kind, member.dim, graph.shapes.get(member.name, ()), pattern,
                            graph.uses.get(member.name, ())))
    group.structure = (group.units, dg.role(group), bool(group.normalized), bool(group.head_dim),
                       bool(group.broadcast), tuple(members))
    return group.structure


def isomorphic_classes(dg, groups=None) -> list[list]:
    """The groups (default: the prunable ones) split into isomorphic classes, each in group order, classes in the
    order of their first group.

    Example::

        >>> [[g.id for g in c] for c in isomorphic_classes(dg)]      # tests.models.BlockStack()
        [[3], [5, 9, 13], [7, 11], [15]]
    """
    groups = dg.prunable_groups if groups is None else list(groups)
    graph = _GraphFacts(dg.gm)
    classes: dict[tuple, list] = {}
    for group in groups:
        classes.setdefault(signature(dg, group, graph), []).append(group)
    return list(classes.values())


def class_ids(dg, groups=None) -> dict:
    """``{group: class index}`` (indices into :func:`isomorphic_classes`), what the planners take."""
    return {g: i for i, members in enumerate(isomorphic_classes(dg, groups)) for g in members}


def isomorphic_plan(groups, scores: dict, ratio, classes: dict, steps: dict | None = None, max_ratio: float = 0.9,
                    fixed: dict | None = None, caps: dict | None = None, normalizer="mean") -> dict:
    """Remove ``ratio`` of the units of every isomorphic class, each class ranked globally on its own.

    ``classes`` is ``{group: class key}`` (:func:`class_ids`; a group missing from it is a class of its own).
    ``ratio`` is one float for every class, or ``{class key: ratio}`` (the iterative ``Pruner`` keeps each
    class at its share of the original units; a class missing from the dict loses nothing). Within a class
    :func:`fxprune.planning.selection.global_plan` ranks: scores normalised per group, at most ``max_ratio``
    (``caps``) of a group, removals rounded to each group's step (``normalizer=None``: scores already on one scale
are ranked as they are). ``fixed`` groups are planned locally.

    Example (two classes of two 32-unit groups each; class 1's scores 100x class 0's, which global ranking
    without normalisation would leave whole)::

        >>> plan = isomorphic_plan(groups, scores, 0.5, {a0: 0, a1: 0, b0: 1, b1: 1})
        >>> sum(len(plan.get(g, ())) for g in (a0, a1)), sum(len(plan.get(g, ())) for g in (b0, b1))
        (32, 32)
    """
    fixed = fixed or {}
    plan = local_plan([g for g in groups if g in fixed], scores, 0.0, steps, fixed)
    by_class: dict = {}
    for group in groups:
        if group in scores and group not in fixed:
            by_class.setdefault(classes.get(group, ("group", group.id)), []).append(group)
    for key, members in by_class.items():
        share = ratio.get(key, 0.0) if isinstance(ratio, dict) else ratio
        if share > 0:
            plan.update(global_plan(members, scores, share, steps, max_ratio, normalizer, caps=caps))
    return plan


class _GraphFacts:
    """What signatures read off a graph, read once: nodes and modules by name, tensor shapes, tensor uses."""

    def __init__(self, gm):
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.modules = dict(gm.named_modules())
        self.shapes = {name: tuple(t.shape) for name, t in gm.named_buffers(remove_duplicate=False)}
        self.shapes.update((name, tuple(t.shape)) for name, t in gm.named_parameters(remove_duplicate=False))
        self.uses = parameter_uses(gm, self.modules)


def parameter_uses(gm, modules: dict | None = None) -> dict:
    """``{parameter or buffer name: sorted ((op kind, argument), ...)}``: how the graph reads each tensor.

    A tensor read by ``get_attr`` is used by every op its node feeds, at that op's argument position (or
    keyword); a module call uses its module's tensors under their attribute names (``Linear``, ``weight``).

    Example (``tests.models.BlockStack``, traced: its Linear layers are module calls)::

        >>> parameter_uses(dg.gm)["blocks.0.mlp.0.weight"]
        (('Linear', 'weight'),)
    """
    modules = dict(gm.named_modules()) if modules is None else modules
    out: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                where = [i for i, a in enumerate(user.args) if a is node] + \
                        [k for k, a in user.kwargs.items() if a is node]
                out.setdefault(node.target, set()).update((_op_kind(user, modules), str(w)) for w in where or ["?"])
        elif node.op == "call_module" and node.target in modules:
            kind = type(modules[node.target]).__name__
            for local, _ in _local_tensors(modules[node.target]):
                out.setdefault(f"{node.target}.{local}", set()).add((kind, local))
    return {name: tuple(sorted(found)) for name, found in out.items()}


def _local_tensors(module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _op_kind(node, modules: dict) -> str:
    """The kind of op a node runs, without names: a module's class, a method's or function's name."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return type(module).__name__ if module is not None else "module"
    if node.op == "call_function":
        return str(node.target) if not hasattr(node.target, "__name__") else node.target.__name__
    if node.op == "call_method":
        return f".{node.target}"
    return node.op


def _activation_shape(node, path: str) -> tuple:
    """The node's output shape (sizes as text: symbolic sizes of a dynamic export compare by name)."""
    value = node.meta.get("val") if node is not None else None
    for index in (int(p) for p in path.rstrip("]").split("][") if p):
        value = value[index] if isinstance(value, (tuple, list)) and index < len(value) else None
    shape = getattr(value, "shape", None)
    return tuple(str(s) for s in shape) if shape is not None else ()


def _pattern(layout, atom: int, solver):
    """A resolved layout with ``atom`` as ``"*"`` and any other atom as its size: where the group sits."""
    if isinstance(layout, Atom):
        return "*" if solver.find(layout.id) == atom else int(solver.sizes[solver.find(layout.id)])
    if isinstance(layout, Cat):
        return ("++",) + tuple(_pattern(p, atom, solver) for p in layout.parts)
    if isinstance(layout, Prod):
        return ("x",) + tuple(_pattern(f, atom, solver) for f in layout.factors)
    return str(layout)
