"""Measured error curves and the allocation they give (``prune(..., allocation="measured")``, issue 20).

Each group has a few measured points ``{units removed: output error}`` (``(0, 0)`` included);
:func:`monotone_cubic` interpolates them without overshoot (the Fritsch-Butland piecewise cubic Hermite
interpolant, as scipy's ``PchipInterpolator``: no scipy needed); :func:`allocate` splits a class's total among its
groups so that the summed interpolated errors are least; :func:`swaps` pairs "one chunk more" with "one chunk less"
of two groups of one class from changes measured in context. Pure functions of numbers, no model.

Example (three groups, errors measured at 0, 2, 4, 6 and 8 units; 10 units to remove in steps of 2)::

    >>> curves = {g: (monotone_cubic(dict(zip(range(0, 10, 2), c))), 8) for g, c in costs.items()}
    >>> allocate(curves, 10, {g: 2 for g in costs})       # doctest: +SKIP
    {'a': 4, 'b': 6, 'c': 0}
"""

from __future__ import annotations

import math
from functools import reduce


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _edge_slope(h0: float, h1: float, m0: float, m1: float) -> float:
    """The end slope of the three-point formula, clipped to keep the curve monotone (scipy's ``_edge_case``)."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    if _sign(d) != _sign(m0):
        return 0.0
    if _sign(m0) != _sign(m1) and abs(d) > 3 * abs(m0):
        return 3 * m0
    return d


def monotone_cubic(points: dict):
    """``f(x)``: the shape-preserving cubic through ``points`` (``{x: y}``, two or more), monotone wherever the
    points are; outside them the end pieces continue. ``monotone_cubic({0: 0, 1: 1, 2: 1})(1.5) == 1.0``."""
    xs = sorted(points)
    ys = [float(points[x]) for x in xs]
    if len(xs) < 2:
        raise ValueError(f"an error curve needs two points or more, got {points}")
    h = [float(b - a) for a, b in zip(xs, xs[1:])]
    m = [(b - a) / w for a, b, w in zip(ys, ys[1:], h)]
    if len(xs) == 2:
        d = [m[0], m[0]]
    else:
        d = [0.0] * len(xs)
        for k in range(1, len(xs) - 1):
            if _sign(m[k]) != _sign(m[k - 1]) or m[k] == 0 or m[k - 1] == 0:
                continue  # a local extremum or a flat piece: slope 0 keeps the curve within the points
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / m[k - 1] + w2 / m[k])  # weighted harmonic mean (Fritsch-Butland)
        d[0] = _edge_slope(h[0], h[1], m[0], m[1])
        d[-1] = _edge_slope(h[-1], h[-2], m[-1], m[-2])

    def f(x: float) -> float:
        k = min(max(sum(1 for a in xs[1:-1] if a <= x), 0), len(h) - 1)
        t = (x - xs[k]) / h[k]
        return (ys[k] * (1 + 2 * t) * (1 - t) ** 2 + h[k] * d[k] * t * (1 - t) ** 2
                + ys[k + 1] * t * t * (3 - 2 * t) + h[k] * d[k + 1] * t * t * (t - 1))

    return f


def allocate(curves: dict, total: int, steps: dict) -> dict:
    """``{group: units removed}`` summing to ``total`` with the least summed ``curves[group][0](units)``, each a
    multiple of ``steps[group]`` in ``[0, curves[group][1]]`` (the most measured); dynamic programming over the
    groups in units of the class's common step. A total the steps or the measured ranges cannot reach is a
    ``ValueError`` naming it."""
    groups = list(curves)
    unit = reduce(math.gcd, [steps[g] for g in groups])
    if total % unit:
        raise ValueError(f"{total} units cannot be split in steps of {unit}")
    best = {0: (0.0, [])}
    for g in groups:
        f, top = curves[g]
        nxt: dict = {}
        for used, (cost, chosen) in best.items():
            for n in range(0, top + 1, steps[g]):
                if used + n // unit > total // unit:
                    break
                c = cost + float(f(n))
                if c < nxt.get(used + n // unit, (float("inf"),))[0]:
                    nxt[used + n // unit] = (c, chosen + [n])
        best = nxt
    if total // unit not in best:
        raise ValueError(f"the measured points reach {max(best) * unit} units, fewer than the {total} to remove")
    return dict(zip(groups, best[total // unit][1]))


def swaps(changes: dict, classes: dict) -> list:
    """Pairs ``(group losing one chunk more, group losing one chunk fewer, predicted change)`` of one class each,
    best first: the pairs of two distinct groups of one class by least summed change, greedily, each group in at
    most one pair, while the sum is negative. ``changes``: ``{(group, +1 or -1): change of the error}``."""
    chosen, used = [], set()
    more = {g: d for (g, s), d in changes.items() if s == 1}
    less = {g: d for (g, s), d in changes.items() if s == -1}
    pairs = sorted(((more[a] + less[b], str(a.id), str(b.id), a, b) for a in more for b in less
                    if a is not b and classes[a] == classes[b]), key=lambda t: t[:3])
    for total, _, _, a, b in pairs:
        if total >= 0:
            break
        if a in used or b in used:
            continue
        chosen.append((a, b, total))
        used |= {a, b}
    return chosen
