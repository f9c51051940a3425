"""The axis-algebra solver (fxprune/layout.py): common refinements, conflicts, index arithmetic."""

import networkx as nx
import numpy as np

from fxprune.algebra.layout import ONE, Atom, Cat, Prod, Solver, decode, kept_indices, new_size


def _atoms(s, *sizes):
    return [Atom(s.new_atom(n)) for n in sizes]


def _sizes(s, layout):
    return [s.sizes[a] for a in s.final_atoms(layout)]


def test_docstring_example_reshape_to_three_factors():
    s = Solver()
    qkv, h, d = s.new_atom(12), s.new_atom(2), s.new_atom(2)
    assert s.unify(Atom(qkv), Prod((Atom(s.new_atom(3)), Atom(h), Atom(d))), "reshape")
    resolved = s.resolve(Atom(qkv))
    assert isinstance(resolved, Prod) and resolved.size(s) == 12
    assert s.final_atoms(resolved)[1:] == [h, d] and _sizes(s, resolved) == [3, 2, 2]


def test_products_with_a_common_refinement():
    # (6 x 2) vs (3 x 4): the common refinement is (3 x 2 x 2)
    s = Solver()
    a, b, c, d = _atoms(s, 6, 2, 3, 4)
    assert s.unify(Prod((a, b)), Prod((c, d)), "view")
    left, right = s.resolve(Prod((a, b))), s.resolve(Prod((c, d)))
    assert left == right and _sizes(s, left) == [3, 2, 2]
    # a was split into (3, 2), d into (2, 2); c is a's outer factor, b is d's inner factor
    assert s.final_atoms(a) == [s.find(c.id), s.final_atoms(d)[0]]
    assert s.final_atoms(d)[1] == s.find(b.id)
    assert isinstance(s.resolve(a), Prod) and isinstance(s.resolve(d), Prod)
    assert not s.conflicts


def test_products_that_only_group_differently():
    # (2 x 3 x 4) vs (6 x 4): 6 becomes (2 x 3), 4 is 4
    s = Solver()
    a, b, c, d, e = _atoms(s, 2, 3, 4, 6, 4)
    assert s.unify(Prod((a, b, c)), Prod((d, e)), "flatten")
    assert s.resolve(d) == Prod((s.resolve(a), s.resolve(b)))
    assert s.final_atoms(d) == [s.find(a.id), s.find(b.id)]
    assert s.find(e.id) == s.find(c.id)
    assert s.resolve(Prod((a, b, c))) == s.resolve(Prod((d, e)))


def test_products_without_a_common_refinement_return_false():
    # (2 x 3) vs (3 x 2): 2 does not divide 3
    s = Solver()
    a, b, c, d = _atoms(s, 2, 3, 3, 2)
    assert s.unify(Prod((a, b)), Prod((c, d)), "transpose-as-view") is False
    assert len(s.conflicts) == 1 and s.conflicts[0][2] == "transpose-as-view"
    assert [s.resolve(x) for x in (a, b, c, d)] == [a, b, c, d]  # nothing was changed


def test_one_atom_on_both_sides_is_split_once():
    # (2 x c4) vs (g4 x 2) with g ~ c: splitting the left side refines c, and the right side, resolved
    # before that, meets the same atom again. Found by the property tests (ShuffleNet-style concat ->
    # grouped conv -> shuffle): defining c a second time dropped the first split and pruned 2 channels of 3.
    s = Solver()
    r, c, g, p = _atoms(s, 2, 4, 4, 2)
    assert s.unify(g, c, "grouped conv input")
    assert s.unify(Prod((r, c)), Prod((g, p)), "shuffle view")
    assert s.resolve(Prod((r, c))) == s.resolve(Prod((g, p)))
    assert s.resolve(c) == s.resolve(g) and len(s.resolve(c).factors) == 2
    assert len(s.final_atoms(Prod((r, c)))) == 1 and not s.conflicts  # r ~ c's halves ~ p: one unit atom


def test_cat_against_cat_cuts_at_every_boundary():
    # (3 ++ 5) vs (5 ++ 3): pieces 3 | 2 | 3
    s = Solver()
    a, b, c, d = _atoms(s, 3, 5, 5, 3)
    assert s.unify(Cat((a, b)), Cat((c, d)), "cat")
    left = s.resolve(Cat((a, b)))
    assert left == s.resolve(Cat((c, d)))
    assert _sizes(s, left) == [3, 2, 3]
    assert s.final_atoms(b) == s.final_atoms(left)[1:] and s.final_atoms(c) == s.final_atoms(left)[:2]
    assert s.find(d.id) == s.final_atoms(b)[1] and s.find(a.id) == s.final_atoms(c)[0]


def test_one_unit_segments_are_not_tied():
    # (3 ++ 5) vs (4 ++ 4): pieces 3 | 1 | 4; the 1-unit pieces of b and c stay two atoms (size <= 1 is a
    # no-op for unify: a 1-unit group can never lose its only unit, so tying it would change nothing)
    s = Solver()
    a, b, c, d = _atoms(s, 3, 5, 4, 4)
    assert s.unify(Cat((a, b)), Cat((c, d)), "cat")
    assert _sizes(s, Cat((a, b))) == _sizes(s, Cat((c, d))) == [3, 1, 4]
    assert s.final_atoms(b)[1] == s.find(d.id) and s.final_atoms(c)[0] == s.find(a.id)
    assert s.final_atoms(b)[0] != s.final_atoms(c)[1]


def test_cat_against_prod_splits_the_outer_factor_into_rows():
    # (4 ++ 8) vs (3 x 4): rows 1 and 2 of the outer factor
    s = Solver()
    a, b, h, d = _atoms(s, 4, 8, 3, 4)
    assert s.unify(Cat((a, b)), Prod((h, d)), "view")
    assert _sizes(s, h) == [1, 2] and isinstance(s.resolve(h), Cat)
    assert s.final_atoms(a) == s.final_atoms(d)  # one row of (1 x d) is d itself
    assert s.resolve(b) == Prod((s.resolve(h).parts[1], s.resolve(d)))
    assert kept_indices(s.resolve(Cat((a, b))), {}, s).tolist() == list(range(12))


def test_cat_that_cuts_through_a_row_is_unrefinable():
    # the module docstring's example: cat(3, 5) viewed as (2, 4)
    s = Solver()
    a, b, r, c = _atoms(s, 3, 5, 2, 4)
    assert s.unify(Cat((a, b)), Prod((r, c)), "view") is False
    assert s.conflicts and "view" in s.conflicts[-1][2]
    assert s.resolve(a) == a and s.resolve(r) == r


def test_different_sizes_are_unrefinable_and_trivial_unifications_are_no_ops():
    s = Solver()
    a, b = _atoms(s, 3, 4)
    assert s.unify(a, b, "size") is False and s.conflicts[-1][2] == "size"
    assert s.unify(Cat((a, b)), Prod((b, a)), "size") is False  # 7 vs 12
    x, y, z = _atoms(s, 6, 2, 3)
    assert s.unify(x, Prod((y, z)), "def")
    edges = len(s.edges)
    assert s.unify(x, Prod((y, ONE, z)), "again")  # resolves to the same layout: nothing to do
    assert s.unify(Atom(z.id), Prod((z, ONE)), "trivial")
    assert len(s.edges) == edges and len(s.conflicts) == 2


def test_same_joins_classes_and_components():
    s = Solver()
    a, b, c, d = _atoms(s, 4, 4, 4, 5)
    assert s.unify(a, b, "add") and s.unify(b, c, "mul")
    assert s.find(a.id) == s.find(b.id) == s.find(c.id) != s.find(d.id)
    graph = s.atom_graph()
    components = sorted((sorted(comp) for comp in nx.connected_components(graph)), key=min)
    assert components == [[a.id, b.id, c.id], [d.id]]
    assert {graph.edges[e]["why"] for e in graph.edges} == {"add", "mul"}
    # an atom with a definition (a compound layout) is not a node: its factors are
    e, f, g = _atoms(s, 6, 2, 3)
    s.unify(e, Prod((f, g)), "view")
    graph = s.atom_graph()
    assert not graph.has_node(e.id) and graph.has_node(f.id) and graph.has_node(g.id)


def test_size_one_axes_are_never_tied():
    s = Solver()
    a, b = _atoms(s, 1, 1)
    assert s.unify(a, b, "broadcast")
    assert s.find(a.id) != s.find(b.id)
    # size-1 factors disappear from a product
    c, one = _atoms(s, 5, 1)
    assert s.resolve(Prod((one, c, one))) == c


def test_decode_kept_indices_and_new_size():
    s = Solver()
    h, d = s.new_atom(2), s.new_atom(3)
    prod = Prod((Atom(h), Atom(d)))
    coords = dict(decode(prod, s))
    assert coords[h].tolist() == [0, 0, 0, 1, 1, 1] and coords[d].tolist() == [0, 1, 2, 0, 1, 2]
    kept = {h: np.array([1]), d: np.array([0, 2])}
    assert kept_indices(prod, kept, s).tolist() == [3, 5]
    assert new_size(prod, kept, s) == 2
    # a concatenation: coordinates are -1 outside a segment; kept indices are offset per segment
    e = s.new_atom(2)
    cat = Cat((Atom(e), prod))
    decoded = decode(cat, s)
    assert [atom for atom, _ in decoded] == [e, h, d]
    assert decoded[0][1].tolist() == [0, 1, -1, -1, -1, -1, -1, -1]
    assert decoded[1][1].tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    kept[e] = np.array([0])
    assert kept_indices(cat, kept, s).tolist() == [0, 2 + 3, 2 + 5]
    assert new_size(cat, kept, s) == 3
    # the same atom twice (GLU's a ++ a): removing unit u removes u and u + n
    twice = Cat((Atom(d), Atom(d)))
    assert kept_indices(twice, {d: np.array([1])}, s).tolist() == [1, 4]
    assert new_size(twice, {}, s) == 6


def test_kept_indices_follow_refinement():
    # an axis of 12 viewed as (3 x 4) then cut (4 ++ 8): removing the middle row's factor unit
    s = Solver()
    flat, h, d, a, b = _atoms(s, 12, 3, 4, 4, 8)
    s.unify(flat, Prod((h, d)), "view")
    s.unify(flat, Cat((a, b)), "split")
    layout = s.resolve(flat)
    assert layout.size(s) == 12
    row0, rows12 = s.final_atoms(h)
    dd = s.final_atoms(d)[0]
    assert s.sizes[row0] == 1 and s.sizes[rows12] == 2
    keep = {rows12: np.array([1]), dd: np.array([0, 3])}
    assert kept_indices(layout, keep, s).tolist() == [0, 3, 8, 11]
    assert new_size(layout, keep, s) == 4


def test_a_shuffle_inside_a_residual_is_a_conflict_not_a_crash():
    """Found by the property tests: a constant-group channel shuffle added to its own input meets one atom twice
    in a product; the first occurrence's split left pieces that no longer line up with the second's radices
    (``IndexError: pop from empty list`` in ``_factorise``). No common refinement: the axes freeze."""
    import fxprune
    from tests.property import archs

    arch = archs.Arch((3, 8, 8), (archs.Conv(3, 12, 1, 1, False, False, None),
                                  archs.Residual((archs.Shuffle(12, 2, "const"),))), archs.Head("flatten", 768), 0)
    model, inputs = archs.build(arch)
    dg = fxprune.analyze(model, inputs)
    assert dg.solver.conflicts and not dg.prunable_groups
