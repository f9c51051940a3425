"""Allocation by measured output error (quality.py's ``(isomorphic, measured allocation)`` row, issue 20).

``obs-output`` with ``isomorphic=True`` allocates each class of groups (all heads, all MLP units) across layers by
a linearised sensitivity taken at the original model. This measures instead what removing units of one group
alone does to the whole model's output, and allocates by that:

1. the isomorphic one-step prune, scores cached (``CachedScores``): it fixes how many units each class loses;
2. one probe prune per fraction of ``PROBES``, every group losing that fraction (ranked within the group by the
   same cached scores, refit with ``reconstruct``); then, per group, the *original* model with only that group's
   units removed and its consumers' refit weights spliced in (``splice``), and its held-out calibration output
   error (``held_out_error``: the output check's sequences and measure). A one-shot refit depends only on the
   original model's statistics and the consumer's own kept units, so the spliced model is exactly "this group
   pruned and refit alone"; splicing every group must give the probe's own error back, which is checked;
3. per class, the counts per group (multiples of its alignment step, at most the largest probe) whose summed
   interpolated errors (monotone cubic through ``(0, 0)`` and the probes) are least, for the class's total from 1;
4. the final prune with those counts as per-group ``ratios`` (cached scores, ``reconstruct``);
5. with ``rounds``, up to that many rounds of swaps measured *in context* (:func:`in_context`): two prunes move
   every group by one chunk (``CHUNK`` of its units, rounded up to its step) more, then less; each group's moved
   version is spliced into the current pruning (the rest stays as pruned) and measured. Per class, the cheapest
   "one chunk more" is paired with the most valuable "one chunk less" of another group while their summed change
   is negative (:func:`swaps`). The swapped allocation is pruned and kept only if its held-out calibration output
   error is below the current one; if not, the single best pair is tried alone; if that fails too, the rounds stop.

The errors of different groups are treated as additive in step 3 (each measured with the rest of the model whole);
the rounds measure each group's change with the rest pruned, which is what the additive model misses.

Example (all-MiniLM-L6-v2, see quality.py)::

    >>> pruned = measured_allocation(model, example_kwargs, calibration, 0.3, ignore,   # doctest: +SKIP
    ...                              dict(importance="obs-output", reconstruct=True), held_out_error)
    >>> pruned.meta[NOTE]                                                               # doctest: +SKIP
    'measured allocation: ...'
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import torch

import fxprune
from fxprune.importance import Criterion, resolve_importance
from fxprune.io.plans import find_group, plan_of
from fxprune.planning.alignment import removal_steps
from fxprune.planning.isomorphic import class_ids

PROBES = (1 / 6, 1 / 3, 1 / 2, 2 / 3)  # fractions of every group removed by the probe prunes
CHUNK = 1 / 24  # a swap moves this fraction of a group's units (MiniLM: 64 of 1536 MLP units, 1 of 12 heads)
NOTE = "quality.py: measured allocation"


class CachedScores(Criterion):
    """``inner``'s scores of the original model, computed once per group (keyed by its parameter members) and
    reused by every later prune of the same model: the probes and the final prune rank units as step 1 did."""

    def __init__(self, inner: Criterion):
        self.inner, self.cache, self.name = inner, {}, f"{inner!r} (cached)"
        self.plan_normalizer = getattr(inner, "plan_normalizer", "mean")

    def score(self, dg, group, tensors):
        key = tuple(sorted(m.name for m in group.parameters))
        if key not in self.cache:
            if getattr(self.inner, "_prepared_for", None) is not dg:
                self.inner.prepare(dg)
            self.cache[key] = self.inner(dg, group, tensors)
        return self.cache[key]


def splice(model, pruned, entries):
    """A copy of ``model`` with the groups of plan ``entries`` (``GroupPlan``s of ``plan_of(pruned)``) taken from
    ``pruned``: their removed units' slices are zero, their kept slices and their modules' other parameters of
    unchanged shape (a refit consumer's bias) are ``pruned``'s. ``model`` may itself be a splice of the same
    original, which is how :func:`in_context` moves one group of a pruning. A unit is assumed to own a contiguous
    block of each member axis (heads: head-major); the full-splice checks in :func:`measured_allocation` and
    :func:`in_context` catch a wrong guess."""
    out = copy.deepcopy(model)
    params, new = dict(out.named_parameters()), pruned.state_dict()
    with torch.no_grad():
        for entry in entries:  # an entry that removes nothing puts back pruned's (unchanged) slices
            for member in entry.members:
                name, axis = member[:-1].rsplit("[", 1)
                axis, p, q = int(axis), params[name], new[name]
                per = p.shape[axis] // entry.units
                index = torch.tensor([u * per + j for u in entry.kept for j in range(per)])
                full = torch.zeros_like(p)
                full.index_copy_(axis, index, q.to(p.dtype))
                p.copy_(full)
                module = name.rpartition(".")[0]
                for other, o in params.items():
                    if other.rpartition(".")[0] == module and other != name and new[other].shape == o.shape:
                        o.copy_(new[other])
    return out


def _interpolate(points: dict):
    from scipy.interpolate import PchipInterpolator

    xs = sorted(points)
    return PchipInterpolator(xs, [points[x] for x in xs])


def allocate(curves: dict, total: int, steps: dict) -> dict:
    """``{group: units removed}`` summing to ``total`` with the least summed ``curves[group](units)``, each a
    multiple of ``steps[group]`` in ``[0, max probed]``; dynamic programming over the groups (in units of the
    class's common step)."""
    groups = list(curves)
    unit = int(np.gcd.reduce([steps[g] for g in groups]))
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
        raise ValueError(f"the probes reach {max(best) * unit} units, fewer than the {total} to remove")
    return dict(zip(groups, best[total // unit][1]))


def _entries(dg, pruned) -> dict:
    """``{group of dg: its GroupPlan}`` of ``pruned``'s plan."""
    plan = plan_of(pruned)
    return {find_group(dg, e.key): e for e in plan.groups}


def error_of(pruned) -> float:
    """The held-out calibration output error ``prune``'s output check measured for ``pruned``."""
    return pruned.meta["fxprune_refit"]["output check"]["output_error"]


def _check_splice(whole: float, own: float, what: str) -> None:
    if abs(whole - own) > 1e-4 * max(1.0, own):
        raise RuntimeError(f"splicing every group of {what} gives error {whole:.6g}, the pruning itself {own:.6g}: "
                           "a unit is not a contiguous block of its axes here")


def in_context(model, dg, current, removal: dict, chunks: dict, prune, measure) -> dict:
    """``{(group, +1 or -1): change of the error}`` when ``group`` alone loses ``chunks[group]`` units more (+1) or
    fewer (-1) than in ``current`` (the pruning of ``removal``, ``{group: units removed}``), the rest as pruned.

    Two prunes (every group one chunk more, then less: ``prune(ratios)``) give every group's moved version, since a
    one-shot refit of a group's consumers depends only on the original's statistics and that group's kept units;
    each is spliced into the splice of ``current`` and measured (``measure(model)``: the held-out calibration output
    error). A move that would remove every unit, or fewer than none, is not measured."""
    own = error_of(current)
    entries = _entries(dg, current)
    base = splice(model, current, entries.values())
    _check_splice(measure(base), own, "the current pruning")
    out = {}
    for sign in (1, -1):
        moved = {g: n + sign * chunks[g] for g, n in removal.items()}
        moved = {g: n for g, n in moved.items() if 0 <= n < g.units}
        other = prune({g: n / g.units for g, n in {**removal, **moved}.items()})
        got = _entries(dg, other)
        for g, n in moved.items():
            if len(got[g].removed) != n:
                raise RuntimeError(f"the moved prune removed {len(got[g].removed)} units of {g.id}, not {n}")
            out[(g, sign)] = measure(splice(base, other, [got[g]])) - own
    return out


def swaps(changes: dict, classes: dict) -> list:
    """Pairs ``(group losing one chunk more, group losing one chunk fewer)`` of one class each, best first: per class,
    the pairs of two distinct groups by least summed change, greedily, each group in at most one pair, while the
    sum is negative. ``changes``: :func:`in_context`'s."""
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


def measured_allocation(model, example_kwargs, calibration, ratio, ignore, options: dict, held_out_error,
                        rounds: int = 0):
    """Prune ``model`` by ``ratio`` per isomorphic class, the class's units allocated across its groups by measured
    held-out calibration output error (module docstring), then up to ``rounds`` rounds of measured swaps.
    ``options``: ``prune``'s (importance, reconstruct, ...); ``held_out_error(model, pruned, calibration)`` is the
    measure. The result's ``meta[NOTE]`` says what it saw, its process CPU seconds included.

    The allocation (steps 1-4) is kept for the next call with the same model, calibration, ratio, options and
    measure, so quality.py's swap-rounds row continues from the plain row instead of redoing it; the result's
    ``meta[REUSED]`` then holds the wall seconds of the reused part (the row adds them to its own), and the CPU
    seconds in the note count it too."""
    cpu, wall = time.process_time(), time.perf_counter()
    options = {k: v for k, v in options.items()
               if k not in ("global_pruning", "isomorphic", "allocation", "rounds")}
    key = (id(model), id(calibration), ratio, tuple(map(id, ignore)), repr(sorted(options.items())),
           id(held_out_error))
    if _LAST and _LAST[0] == key:
        state = _LAST[1]
        result = _swap_rounds(model, calibration, held_out_error, copy.deepcopy(state["final"]), rounds, state, cpu)
        result.meta[REUSED] = state["wall"]  # on the result: a round's swap returns a new pruning
        return result
    criterion = CachedScores(resolve_importance(options.pop("importance"), calibration))

    def prune(r, **extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fxprune.prune(model, r, example_inputs=(), kwargs=example_kwargs, ignore=ignore,
                                 calibration=calibration, importance=criterion, **options, **extra)

    def prune_counts(ratios: dict):
        return prune(0.0, ratios={g.id: r for g, r in ratios.items() if r})

    one_step = prune(ratio, global_pruning=True, isomorphic=True)
    base = plan_of(one_step)
    dg = fxprune.analyze(model, (), kwargs=example_kwargs, ignore=ignore)
    base_removed = {g: len(u) for g, u in base.removal(dg).items()}
    classes, steps = class_ids(dg), removal_steps(dg, dg.prunable_groups, base.settings.get("alignment", 1))
    points: dict = {}
    for fraction in PROBES:
        probe = prune(fraction)
        entries = _entries(dg, probe)
        _check_splice(held_out_error(model, splice(model, probe, entries.values()), calibration), error_of(probe),
                      f"the {fraction:.3g} probe")
        for g in (g for g, e in entries.items() if e.removed):
            alone = splice(model, probe, [entries[g]])
            points.setdefault(g, {0: 0.0})[len(entries[g].removed)] = held_out_error(model, alone, calibration)
    removal = {}
    for c in sorted({classes[g] for g in points}):
        members = [g for g in points if classes[g] == c]
        curves = {g: (_interpolate(points[g]), max(points[g])) for g in members}
        removal.update(allocate(curves, sum(base_removed.get(g, 0) for g in members), steps))

    def final_prune(counts: dict):
        pruned = prune_counts({g: n / g.units for g, n in counts.items()})
        got = {g: len(u) for g, u in plan_of(pruned).removal(dg).items()}
        if any(got.get(g, 0) != n for g, n in counts.items()):
            raise RuntimeError(f"the prune removed {got}, not the allocation {counts}")
        return pruned

    final = final_prune(removal)
    state = dict(one_step=one_step, final=final, removal=removal, dg=dg, classes=classes, steps=steps,
                 prune_counts=prune_counts, final_prune=final_prune, cpu=time.process_time() - cpu,
                 wall=time.perf_counter() - wall)
    _LAST[:] = [key, state]
    return _swap_rounds(model, calibration, held_out_error, final, rounds, state, time.process_time())


_LAST: list = []  # [key, state] of the last allocation (measured_allocation's docstring)
REUSED = "quality.py: reused seconds"  # meta key: wall seconds of a reused allocation


def _swap_rounds(model, calibration, held_out_error, final, rounds: int, state: dict, cpu: float):
    """Step 5 (module docstring) from the allocation ``state``; ``final`` is its pruning. Writes the note."""
    dg, classes, steps, removal = state["dg"], state["classes"], state["steps"], state["removal"]
    prune_counts, final_prune = state["prune_counts"], state["final_prune"]

    allocated = error_of(final)
    chunks = {g: -(-max(1, round(g.units * CHUNK)) // steps[g]) * steps[g] for g in removal}
    history = []
    for _ in range(rounds):
        changes = in_context(model, dg, final, removal, chunks, prune_counts,
                             lambda m: held_out_error(model, m, calibration))
        pairs = swaps(changes, classes)
        accepted = None
        for tried in ([pairs, pairs[:1]] if len(pairs) > 1 else [pairs]):
            if not tried:
                break
            counts = dict(removal)
            for a, b, _ in tried:
                counts[a] += chunks[a]
                counts[b] -= chunks[b]
            candidate = final_prune(counts)
            history.append(f"{len(tried)} swap(s) predicted {sum(t for *_, t in tried):+.3f}, "
                           f"measured {error_of(candidate) - error_of(final):+.3f}")
            if error_of(candidate) < error_of(final):
                accepted = (counts, candidate)
                break
        if accepted is None:
            history.append("stopped")
            break
        removal, final = accepted
    one_error, error = error_of(state["one_step"]), error_of(final)
    swapped = (f" after at most {rounds} round(s) of in-context swaps (allocated {allocated:.4g}; "
               + "; ".join(history) + ")" if rounds else "")
    final.meta[NOTE] = (f"measured allocation ({len(PROBES)} probes): held-out calibration output error {error:.4g}"
                        f"{swapped} (one step {one_error:.4g}); removed per group "
                        + ", ".join(f"{n}/{g.units}" for g, n in removal.items())
                        + f"; pruning {state['cpu'] + time.process_time() - cpu:.0f} CPU s")
    return final
