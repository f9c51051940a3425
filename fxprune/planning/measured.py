"""``prune(..., allocation="measured")``: each isomorphic class's units spread across its groups by measured error.

Isomorphic pruning (``isomorphic=True``, :mod:`fxprune.planning.isomorphic`) allocates each class of groups (all
heads, all MLP units) across layers by a sensitivity estimated at the original model. This measures instead what
removing units of one group alone does to the whole model's output on the held-out calibration sequences (the
output check's, :mod:`fxprune.calibration.output_check`), and allocates by that:

1. the isomorphic one-step prune, scores cached (:class:`CachedScores`): it fixes how many units each class loses;
2. one probe prune per fraction of ``PROBES``, every group losing that fraction (ranked within the group by the
   same scores, refit), then per group the original model with only that group spliced in
   (:mod:`fxprune.planning.splice`) and its held-out output error. Splicing every group must give the probe's own
   error back; if it does not (or an axis is shared by two groups), the one-step pruning is returned with a
   warning;
3. per class, the counts per group (multiples of its alignment step, at most the largest probe) whose summed
   interpolated errors (:func:`fxprune.planning.error_curves.monotone_cubic` through ``(0, 0)`` and the probes)
   are least, for the class's total (:func:`fxprune.planning.error_curves.allocate`);
4. the final prune with those counts as per-group ratios;
5. with ``rounds``, up to that many rounds of swaps measured *in context* (:func:`in_context`): two prunes move
   every group by one chunk (``CHUNK`` of its units, rounded up to its step) more, then less; each moved group is
   spliced into the current pruning and measured; per class the cheapest "one chunk more" is paired with the most
   valuable "one chunk less" of another group while their summed change is negative
   (:func:`fxprune.planning.error_curves.swaps`). The swapped allocation is kept only if its held-out error is
   below the current one; if not, the single best pair is tried alone; if that fails too, the rounds stop.

If the result's held-out error is not below the one-step pruning's, the one-step pruning is returned, with a
warning giving both. What happened is in ``result.meta[REPORT]`` (``"fxprune_allocation"``, :func:`report`).

The model-facing steps (pruning, measuring, reading a plan) are the caller's: ``fxprune.api`` passes a
:class:`Prober`-like object, so planning imports neither calibration nor the pipeline.

Example (all-MiniLM-L6-v2 at 30%, calibrated on 1024 English sentences: held-out error 5.65 against the one-step
pruning's higher one, everyday cosine 0.946; ``benchmarks/quality.py``)::

    >>> pruned = fxprune.prune(model, 0.3, kwargs=batch, calibration=batches, importance="obs-output",
    ...                        reconstruct=True, global_pruning=True, isomorphic=True, allocation="measured")
    >>> pruned.meta["fxprune_allocation"]["kept"]           # doctest: +SKIP
    'measured'
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Protocol

from fxprune.importance import Criterion
from fxprune.planning.alignment import removal_steps
from fxprune.planning.error_curves import allocate, monotone_cubic, swaps
from fxprune.planning.isomorphic import class_ids
from fxprune.planning.splice import SpliceError, splice

PROBES = (1 / 6, 1 / 3, 1 / 2, 2 / 3)  # fractions of every group removed by the probe prunes
CHUNK = 1 / 24  # a swap moves this fraction of a group's units (MiniLM: 64 of 1536 MLP units, 1 of 12 heads)
REPORT = "fxprune_allocation"  # result.meta key: what the measured allocation did (module docstring)


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


class Prober(Protocol):
    """What :func:`measured_allocation` needs of the caller (``fxprune.api`` implements it):

    - ``model``: the original, ``dg``: its analysis (the groups the plans name);
    - ``prune(ratio, **options)``: a pruning of ``model`` with ``prune``'s options plus these (``ratios``, or
      ``global_pruning``/``isomorphic`` for the one-step prune), the one cached criterion, a one-shot refit;
    - ``entries(pruned)``: ``{group of dg: its GroupPlan}`` of ``pruned``'s plan; ``alignment(pruned)``: its plan's
      alignment in channels;
    - ``error(pruned)``: the held-out output error ``pruned``'s own output check measured;
      ``measure(candidate)``: that error for any model of the original's shapes (a splice)."""


def _parts(entries: dict) -> list:
    """:func:`splice`'s ``(group, kept units)`` pairs of ``{group: GroupPlan}``."""
    return [(g, e.kept) for g, e in entries.items()]


def _check_splice(whole: float, own: float, what: str) -> str | None:
    if abs(whole - own) > 1e-4 * max(1.0, own):
        return (f"splicing every group of {what} into the original gives held-out error {whole:.6g}, the pruning "
                f"itself {own:.6g}")
    return None


@contextlib.contextmanager
def _quiet():
    """The probes' and moved prunes' warnings are the final prune's own, many times over: not repeated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def in_context(probe, current, removal: dict, chunks: dict) -> dict:
    """``{(group, +1 or -1): change of the error}`` when ``group`` alone loses ``chunks[group]`` units more (+1) or
    fewer (-1) than in ``current`` (the pruning of ``removal``, ``{group: units removed}``), the rest as pruned.
    Two prunes (every group one chunk more, then less) give every group's moved version; each is spliced into the
    splice of ``current`` and measured. A move that would remove every unit, or fewer than none, is not measured."""
    own = probe.error(current)
    base = splice(probe.model, current, _parts(probe.entries(current)))
    problem = _check_splice(probe.measure(base), own, "the current pruning")
    if problem:  # the probes' splices matched: this would be new
        raise SpliceError(problem)
    out = {}
    for sign in (1, -1):
        moved = {g: n + sign * chunks[g] for g, n in removal.items()}
        moved = {g: n for g, n in moved.items() if 0 <= n < g.units}
        counts = {**removal, **moved}
        with _quiet():
            other = probe.prune(0.0, ratios={g.id: n / g.units for g, n in counts.items() if n})
        got = probe.entries(other)
        for g, n in moved.items():
            if len(got[g].removed) != n:
                raise RuntimeError(f"the moved prune removed {len(got[g].removed)} units of {g.id}, not {n}")
            out[(g, sign)] = probe.measure(splice(base, other, [(g, got[g].kept)])) - own
    return out


def measured_allocation(probe, ratio: float, rounds: int = 0):
    """Prune ``probe.model`` by ``ratio`` per isomorphic class, allocated by measured held-out output error (module
    docstring), then up to ``rounds`` rounds of measured swaps; the pruning whose error is least of this and the
    one-step pruning, ``meta[REPORT]`` saying what happened (:func:`report`)."""
    cpu = time.process_time()
    one_step = probe.prune(ratio, global_pruning=True, isomorphic=True)
    dg = probe.dg
    base_removed = {g: len(e.removed) for g, e in probe.entries(one_step).items()}
    classes = class_ids(dg)
    steps = removal_steps(dg, dg.prunable_groups, probe.alignment(one_step))
    info = dict(one_step=one_step, one_step_removed=base_removed, classes=classes, rounds=rounds, history=[],
                cpu=cpu, error=probe.error)
    points: dict = {}
    for fraction in PROBES:
        with _quiet():
            probed = probe.prune(fraction)
        entries = probe.entries(probed)
        try:
            whole = probe.measure(splice(probe.model, probed, _parts(entries)))
        except SpliceError as exc:
            return _fall_back(info, f"the {fraction:.3g} probe cannot be spliced into the original: {exc}")
        problem = _check_splice(whole, probe.error(probed), f"the {fraction:.3g} probe")
        if problem:
            return _fall_back(info, problem)
        for g in (g for g, e in entries.items() if e.removed):
            alone = splice(probe.model, probed, [(g, entries[g].kept)])
            points.setdefault(g, {0: 0.0})[len(entries[g].removed)] = probe.measure(alone)
    removal = {}
    for c in sorted({classes[g] for g in points}):
        members = [g for g in points if classes[g] == c]
        curves = {g: (monotone_cubic(points[g]), max(points[g])) for g in members}
        removal.update(allocate(curves, sum(base_removed.get(g, 0) for g in members), steps))

    def final_prune(counts: dict):
        pruned = probe.prune(0.0, ratios={g.id: n / g.units for g, n in counts.items() if n})
        got = {g: len(e.removed) for g, e in probe.entries(pruned).items()}
        if any(got.get(g, 0) != n for g, n in counts.items()):
            raise RuntimeError(f"the prune removed {got}, not the allocation {counts}")
        return pruned

    final = final_prune(removal)
    info["allocated_error"] = probe.error(final)
    chunks = {g: -(-max(1, round(g.units * CHUNK)) // steps[g]) * steps[g] for g in removal}
    for _ in range(rounds):
        try:
            changes = in_context(probe, final, removal, chunks)
        except SpliceError as exc:
            info["history"].append(f"stopped: {exc}")
            break
        pairs = swaps(changes, classes)
        accepted = None
        for tried in ([pairs, pairs[:1]] if len(pairs) > 1 else [pairs]):
            if not tried:
                break
            counts = dict(removal)
            for a, b, _ in tried:
                counts[a] += chunks[a]
                counts[b] -= chunks[b]
            with _quiet():  # the first final prune's warnings were shown
                candidate = final_prune(counts)
            info["history"].append(f"{len(tried)} swap(s) predicted {sum(t for *_, t in tried):+.3f}, "
                                   f"measured {probe.error(candidate) - probe.error(final):+.3f}")
            if probe.error(candidate) < probe.error(final):
                accepted = (counts, candidate)
                break
        if accepted is None:
            info["history"].append("stopped")
            break
        removal, final = accepted
    if probe.error(final) >= probe.error(one_step):
        return _fall_back(info, f"the measured allocation's held-out output error {probe.error(final):.6g} is not "
                                f"below the one-step allocation's {probe.error(one_step):.6g}", removal, final)
    final.meta[REPORT] = report(info, removal, final, "measured")
    return final


def _fall_back(info: dict, reason: str, removal: dict | None = None, final=None):
    one_step = info["one_step"]
    warnings.warn(f"fxprune: allocation='measured' kept the one-step isomorphic allocation: {reason}", stacklevel=4)
    one_step.meta[REPORT] = report(info, removal, final, "one-step", reason)
    return one_step


def report(info: dict, removal: dict | None, final, kept: str, reason: str | None = None) -> dict:
    """``meta[REPORT]``: ``kept`` (``"measured"`` or ``"one-step"``) and ``reason`` (why the one-step pruning was
    kept, else None); ``removed`` and ``one_step_removed``, per class index (:func:`class_ids`) ``{group id:
    [units removed, units]}``; ``one_step_error``, ``allocated_error`` (after step 4), ``measured_error`` (after
    the rounds; None where not reached); ``rounds`` asked and ``history`` of the swaps tried; ``probes``;
    ``cpu_seconds`` of the whole call (process CPU time: every thread); ``note``, one line of all that."""
    one_step, classes = info["one_step"], info["classes"]
    error_of = info["error"](one_step)

    def per_class(counts: dict | None):
        if counts is None:
            return None
        out: dict = {}
        for g, n in counts.items():
            out.setdefault(str(classes.get(g, "-")), {})[str(g.id)] = [int(n), int(g.units)]
        return out

    measured = info["error"](final) if final is not None else None
    cpu = time.process_time() - info["cpu"]
    history = "; ".join(info["history"])
    note = (f"measured allocation ({len(PROBES)} probes): held-out calibration output error "
            + (f"{measured:.4g}" if measured is not None else "not reached")
            + (f" after at most {info['rounds']} round(s) of in-context swaps (allocated "
               f"{info['allocated_error']:.4g}; {history})" if info["rounds"] and "allocated_error" in info else "")
            + f" (one step {error_of:.4g}); "
            + ("removed per group " + ", ".join(f"{n}/{g.units}" for g, n in removal.items()) + "; "
               if removal else "")
            + (f"kept the one-step pruning: {reason}; " if kept == "one-step" else "")
            + f"pruning {cpu:.0f} CPU s")
    return {"kept": kept, "reason": reason, "removed": per_class(removal),
            "one_step_removed": per_class(info["one_step_removed"]), "one_step_error": float(error_of),
            "allocated_error": info.get("allocated_error"), "measured_error": measured, "rounds": info["rounds"],
            "history": list(info["history"]), "probes": list(PROBES), "cpu_seconds": cpu, "note": note}
