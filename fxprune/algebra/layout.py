"""Axis layouts and the solver that refines them into atoms.

Every tensor axis starts as one :class:`Atom`. Relations between axes are
*unifications* of layout expressions:

* ``Atom(a)``                 an index space of ``size(a)`` units,
* ``Cat((l1, l2, ..))``       the axis is l1 followed by l2 ... (concat / split),
* ``Prod((l1, l2, ..))``      flat index = row-major coordinate over l1, l2 ... (view / reshape).

Unifying two layouts of equal size computes their common refinement. An atom
unified with a compound layout gets that layout as its *definition*; atoms
unified with each other join one union-find class. After solving, an axis is
resolved to a tree over *final* atoms (classes without a definition), and a
class is a pruning group.

Worked example::

    >>> s = Solver()
    >>> qkv, h, d = s.new_atom(12), s.new_atom(2), s.new_atom(2)
    >>> s.unify(Atom(qkv), Prod((Atom(s.new_atom(3)), Atom(h), Atom(d))), "reshape")
    >>> s.resolve(Atom(qkv)).size(s)        # still 12, now a product of 3 final atoms
    12
    >>> len(s.final_atoms(s.resolve(Atom(qkv))))
    3

Where no common refinement exists (``cat(3, 5)`` viewed as ``(2, 4)``), the
relation cannot be expressed; every atom on both sides is frozen with the reason,
so nothing that could be inconsistent is ever pruned.

How unification refines (the rules of ``Solver.unify``): products align on common suffix products (a divisibility
chain), concatenations on the union of their boundaries; a product meets a concatenation by splitting its outer
factor on row boundaries. Every split works on the layout as resolved at that moment (one side's split may already
have refined an atom the other side shares). Size-1 factors vanish. ``dg.graph`` (networkx) is a graph over final
atoms with ``same`` edges and a group is a connected component of it. ``kept_indices`` gives the surviving flat
indices of any layout under a plan (outer sums over products, offsets over concatenations), ``decode`` the
coordinate of every flat index on every atom occurrence (for importance and member slices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np


@dataclass(frozen=True)
class Atom:
    id: int

    def size(self, solver: "Solver") -> int:
        return solver.sizes[self.id]


@dataclass(frozen=True)
class Cat:
    parts: tuple

    def size(self, solver: "Solver") -> int:
        return sum(p.size(solver) for p in self.parts)


@dataclass(frozen=True)
class Prod:
    factors: tuple

    def size(self, solver: "Solver") -> int:
        return math.prod(f.size(solver) for f in self.factors)


ONE = Prod(())  # the empty product: a size-1 axis with no units of its own


class Unrefinable(Exception):
    """Two layouts have no common refinement (raised inside :meth:`Solver.unify`)."""


class Solver:
    """Union-find over atoms with compound definitions (see module docstring)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.origin: list[str] = []
        self._parent: list[int] = []
        self.definition: dict[int, object] = {}
        self.edges: list[tuple[int, int, str]] = []
        self.conflicts: list[tuple[object, object, str]] = []

    # -- atoms -----------------------------------------------------------
    def new_atom(self, size: int, origin: str = "") -> int:
        self.sizes.append(int(size))
        self.origin.append(origin)
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:  # path compression
            self._parent[a], a = root, self._parent[a]
        return root

    # -- normal form -----------------------------------------------------
    def resolve(self, layout):
        """Expand definitions down to final atoms and normalise the tree."""
        if isinstance(layout, Atom):
            root = self.find(layout.id)
            if root in self.definition:
                return self.resolve(self.definition[root])
            return Atom(root)
        if isinstance(layout, Cat):
            parts = []
            for p in layout.parts:
                r = self.resolve(p)
                if isinstance(r, Cat):
                    parts.extend(r.parts)
                elif r.size(self) > 0:
                    parts.append(r)
            return parts[0] if len(parts) == 1 else Cat(tuple(parts))
        factors = []
        for f in layout.factors:
            r = self.resolve(f)
            if isinstance(r, Prod):
                factors.extend(r.factors)
            elif r.size(self) != 1:
                factors.append(r)
        return factors[0] if len(factors) == 1 else Prod(tuple(factors))

    def final_atoms(self, layout, resolved: bool = False) -> list[int]:
        """Final atom classes of a layout, in order, with repeats removed; ``resolved=True`` for a layout that
        :meth:`resolve` returned since the last unification (resolving is idempotent: skipped)."""
        out: list[int] = []

        def walk(node):
            if isinstance(node, Atom):
                if node.id not in out:
                    out.append(node.id)
            else:
                for child in node.parts if isinstance(node, Cat) else node.factors:
                    walk(child)

        walk(layout if resolved else self.resolve(layout))
        return out

    # -- unification -----------------------------------------------------
    def unify(self, left, right, why: str) -> bool:
        """Make two layouts of equal size denote the same indices.

        Returns False (and records a conflict) when no common refinement exists.
        """
        try:
            self._unify(left, right, why)
            return True
        except Unrefinable:
            self.conflicts.append((left, right, why))
            return False

    def _unify(self, left, right, why: str) -> None:
        a, b = self.resolve(left), self.resolve(right)
        if a.size(self) != b.size(self):
            raise Unrefinable(f"sizes differ: {a.size(self)} vs {b.size(self)}")
        if a == b or a.size(self) <= 1:
            return
        if isinstance(a, Atom) and isinstance(b, Atom):
            self._parent[b.id] = a.id
            self.edges.append((a.id, b.id, why))
        elif isinstance(a, Atom):
            self._define(a.id, b)
        elif isinstance(b, Atom):
            self._define(b.id, a)
        elif isinstance(a, Prod) and isinstance(b, Prod):
            self._unify_products(a, b, why)
        else:
            self._unify_segments(a, b, why)

    def _define(self, atom: int, layout) -> None:
        if atom in self.final_atoms(layout):
            raise Unrefinable("an axis cannot contain itself")
        self.definition[atom] = layout

    def _unify_products(self, a: Prod, b: Prod, why: str) -> None:
        cuts = sorted(set(_suffix_products(self, a)) | set(_suffix_products(self, b)))
        for small, big in zip(cuts, cuts[1:]):
            if big % small:
                raise Unrefinable(f"no common factorisation of {a} and {b}")
        fa, fb = self._split_factors(a, cuts), self._split_factors(b, cuts)
        for x, y in zip(fa, fb):
            self._unify(x, y, why)

    def _split_factors(self, prod: Prod, cuts: list[int]) -> list:
        """Refine each factor so that the product's suffix sizes are exactly ``cuts``."""
        out = []
        inner = 1
        for factor in reversed(prod.factors):
            outer = inner * factor.size(self)
            inside = [c for c in cuts if inner < c < outer]
            radices = [b // s for s, b in zip([inner] + inside, inside + [outer])]
            out.extend(reversed(self._factorise(factor, radices[::-1])))
            inner = outer
        return out[::-1]

    def _factorise(self, layout, radices: list[int]) -> list:
        """``layout`` as ``len(radices)`` row-major factors of those sizes.

        The layout is resolved first: splitting the other side of the same unification
        may have refined it since its product was resolved (a grouped conv's groups atom
        tied to a shuffle's channels-per-group is split by one side, then met again by
        the other). Defining the stale atom again would drop that refinement.
        """
        if len(radices) == 1:
            return [layout]
        layout = self.resolve(layout)
        if isinstance(layout, Atom):
            parts = [Atom(self.new_atom(r, f"factor of #{layout.id}")) for r in radices]
            self._define(layout.id, Prod(tuple(parts)))
            return parts
        if isinstance(layout, Prod):
            suffixes = [math.prod(radices[i:]) for i in range(1, len(radices))]
            pieces, groups = self._split_factors(layout, suffixes), []
            for radix in radices:
                group, size = [], 1
                while size < radix and pieces:
                    group.append(pieces.pop(0))
                    size *= group[-1].size(self)
                if size != radix:
                    # the same atom met twice in one product (a channel shuffle with constant groups inside a
                    # residual) can be refined by its first occurrence so that its pieces no longer line up
                    # with these radices: no common refinement, so the relation freezes (safe), never crashes
                    raise Unrefinable(f"cannot factorise {layout} into {radices}")
                groups.append(group[0] if len(group) == 1 else Prod(tuple(group)))
            return groups
        raise Unrefinable(f"cannot factorise a concatenation {layout} into {radices}")

    def _unify_segments(self, a, b, why: str) -> None:
        cuts = sorted(set(_offsets(self, a)) | set(_offsets(self, b)))
        pa, pb = self._split_segments(a, cuts), self._split_segments(b, cuts)
        for x, y in zip(pa, pb):
            self._unify(x, y, why)

    def _split_segments(self, layout, cuts: list[int]) -> list:
        """Pieces of ``layout`` between consecutive ``cuts`` (which include 0 and size)."""
        layout = self.resolve(layout)
        size = layout.size(self)
        inner = [c for c in cuts if 0 < c < size]
        if not inner:
            return [layout]
        if isinstance(layout, Atom):
            bounds = [0] + inner + [size]
            parts = [Atom(self.new_atom(e - s, f"segment of #{layout.id}")) for s, e in zip(bounds, bounds[1:])]
            self._define(layout.id, Cat(tuple(parts)))
            return parts
        if isinstance(layout, Cat):
            pieces, offset = [], 0
            for part in layout.parts:
                psize = part.size(self)
                local = [0] + [c - offset for c in inner if offset < c < offset + psize] + [psize]
                pieces.extend(self._split_segments(part, local))
                offset += psize
            return pieces
        # Prod: only cuts that fall on rows of the outermost factor are expressible.
        head, rest = layout.factors[0], Prod(layout.factors[1:])
        stride = rest.size(self)
        if any(c % stride for c in inner):
            raise Unrefinable(f"a segment boundary cuts through a row of {layout}")
        rows = self._split_segments(head, [0] + [c // stride for c in inner] + [head.size(self)])
        return [Prod((row, rest)) for row in rows]

    # -- results ---------------------------------------------------------
    def atom_graph(self) -> nx.Graph:
        """Final atoms as nodes, ``same`` relations as edges; components are groups."""
        graph = nx.Graph()
        for atom in range(len(self.sizes)):
            if self.find(atom) not in self.definition:
                graph.add_node(atom, size=self.sizes[atom])
        for a, b, why in self.edges:
            if graph.has_node(a) and graph.has_node(b):
                graph.add_edge(a, b, why=why)
        return graph


def _suffix_products(solver: Solver, prod: Prod) -> list[int]:
    out, acc = [1], 1
    for f in reversed(prod.factors):
        acc *= f.size(solver)
        out.append(acc)
    return out


def _offsets(solver: Solver, layout) -> list[int]:
    """Segment boundaries a layout must keep: every part boundary of a Cat."""
    if isinstance(layout, Cat):
        out, acc = [0], 0
        for p in layout.parts:
            acc += p.size(solver)
            out.append(acc)
        return out
    return [0, layout.size(solver)]


# -- index arithmetic over resolved layouts -------------------------------
def new_size(layout, kept: dict[int, np.ndarray], solver: Solver) -> int:
    """Size of a resolved layout once ``kept`` units remain in each final atom."""
    if isinstance(layout, Atom):
        return len(kept[layout.id]) if layout.id in kept else solver.sizes[layout.id]
    if isinstance(layout, Cat):
        return sum(new_size(p, kept, solver) for p in layout.parts)
    return math.prod(new_size(f, kept, solver) for f in layout.factors)


def kept_indices(layout, kept: dict[int, np.ndarray], solver: Solver) -> np.ndarray:
    """Flat indices of a resolved layout that survive, in increasing order."""
    if isinstance(layout, Atom):
        return kept[layout.id] if layout.id in kept else np.arange(solver.sizes[layout.id])
    if isinstance(layout, Cat):
        chunks, offset = [], 0
        for p in layout.parts:
            chunks.append(kept_indices(p, kept, solver) + offset)
            offset += p.size(solver)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    flat = np.zeros(1, dtype=np.int64)
    for f in layout.factors:
        flat = np.add.outer(flat * f.size(solver), kept_indices(f, kept, solver)).ravel()
    return flat


def decode(layout, solver: Solver) -> list[tuple[int, np.ndarray]]:
    """For each atom occurrence in a resolved layout: (atom, coordinate of every flat index).

    Coordinates are -1 where a flat index lies outside that occurrence (another
    segment of a Cat). Example: ``Prod((Atom(h), Atom(d)))`` with sizes 2 and 3
    gives ``[(h, [0,0,0,1,1,1]), (d, [0,1,2,0,1,2])]``.
    """
    size = layout.size(solver)
    if isinstance(layout, Atom):
        return [(layout.id, np.arange(size))]
    out = []
    if isinstance(layout, Cat):
        offset = 0
        for p in layout.parts:
            psize = p.size(solver)
            for atom, coords in decode(p, solver):
                full = np.full(size, -1, dtype=np.int64)
                full[offset:offset + psize] = coords
                out.append((atom, full))
            offset += psize
        return out
    flat = np.arange(size)
    stride = size
    for f in layout.factors:
        fsize = f.size(solver)
        stride //= fsize
        coord = (flat // stride) % fsize
        for atom, coords in decode(f, solver):
            out.append((atom, coords[coord]))
    return out
