"""Aligned shapes: how many units a group may lose at a time so that aligned weight dimensions stay aligned.

GEMM and convolution kernels are fastest when channel counts are multiples of a
small power of two: tensor cores want multiples of 8 half-precision values, and
CPU kernels vector widths. A model pruned to 2867 hidden channels falls off those
paths and can be *slower* than the original. So every weight dimension whose
original size is a multiple of the alignment ``A`` must stay one. ``A`` is 8: on
an AVX-512 CPU, odd widths cost up to 11% (linear) and 10% (3x3 conv) against the
multiple of 8 or 16 below them, while multiples of 8 ran as fast as multiples of
16 (``benchmarks/alignment.py``, ``benchmarks/alignment_cpu.md``), so 16 would
only make the steps coarser.

A dimension's layout says how each group sits in it, and so how the dimension
changes when a group loses units:

* a group filling the axis (``Atom``): the change is the units removed, so the
  group loses a multiple of ``A``;
* a factor of a product (``heads x head_dim``): the other factors absorb what
  they can (a frozen head width of 128 absorbs all of 8, so heads can go one
  at a time), the pruned factors share the rest;
* a segment of a concatenation: each segment changes by a multiple of ``A``.

Example: LLaMA's hidden size 4096 (one group) with ``A = 8`` gives a step of 8;
``q_proj.weight[0] = kv_heads x rep x head_dim(128)`` gives the kv heads a step
of 1. ``removal_steps`` returns ``{group: step}`` (the lcm over every weight the
group appears in); :func:`fxprune.planning.selection.round_keep` honours it::

    >>> steps = removal_steps(dg, dg.prunable_groups, 8)
    >>> steps[dg.group_of("model.norm.weight", 0)]
    8
"""

from __future__ import annotations

import math

from fxprune.algebra.layout import Atom, Cat, Prod

def default_alignment(model) -> int:
    """The channel multiple kernels prefer for ``model``'s parameters on their device: 8.

    Tensor cores take float16/bfloat16 (and TF32) GEMMs in multiples of 8; on the CPU,
    8 float32 lanes (AVX2) and AVX-512 kernels were measured equally fast at multiples of
    8 and of 16 (module docstring). A model on the meta device gets the same: it will run
    on a GPU or a CPU that cannot be seen from here.
    """
    return 8


def removal_steps(dg, groups, alignment: int) -> dict:
    """``{group: step}``: each group in ``groups`` must lose a multiple of ``step`` units (1 = any number)."""
    if alignment <= 1:
        return {g: 1 for g in groups}
    pruned = {g.atom for g in groups}  # a group is one final atom class
    needs: dict[int, int] = {}
    for (key, _dim), layout in dg.layouts.items():
        if key[0] != "p" or dg.kinds.get(key[1]) != "parameter":
            continue
        atoms = set(dg.solver.final_atoms(layout))
        if not atoms & pruned or layout.size(dg.solver) % alignment:
            continue
        _require(layout, alignment, dg.solver, pruned, needs)
    return {g: needs.get(g.atom, 1) for g in groups}


def _require(layout, a: int, solver, pruned: set, needs: dict) -> None:
    """Record, per pruned atom, the step that keeps ``layout``'s size unchanged modulo ``a``."""
    if a <= 1:
        return
    if isinstance(layout, Atom):
        if layout.id in pruned:
            needs[layout.id] = math.lcm(needs.get(layout.id, 1), a)
        return
    if isinstance(layout, Cat):
        for part in layout.parts:
            _require(part, a, solver, pruned, needs)
        return
    factors = list(layout.factors)
    moving = [f for f in factors if set(solver.final_atoms(f)) & pruned]
    fixed = math.prod(f.size(solver) for f in factors if f not in moving)
    if len(moving) == 1 or layout.size(solver) % a:
        # one factor changes: the others multiply its change (also the fallback for an unaligned product)
        for f in moving:
            others = fixed * math.prod(g.size(solver) for g in moving if g is not f)
            _require(f, a // math.gcd(a, others), solver, pruned, needs)
        return
    rest = a // math.gcd(a, fixed)  # the size stays a multiple of `a` if each moving factor keeps its share
    for f in reversed(moving):  # inner factors first: head dims before heads
        share = math.gcd(rest, f.size(solver))
        _require(f, share, solver, pruned, needs)
        rest //= share
