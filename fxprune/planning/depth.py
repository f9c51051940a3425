"""Depth plans: which residual branches (or whole layers) to remove, from their scores.

The request is one of:

- ``depth=0.25``: that fraction of the removable branches (rounded to the nearest count);
- ``depth={"attention": 0.5, "mlp": 0.1}``: a fraction of each kind (``Branch.kind``: ``"attention"``, ``"mlp"``,
  ``"conv"``; a kind the model has no branch of is an error naming the kinds it has);
- ``layers=k``: ``k`` whole layers (:attr:`DependencyGraph.layers`, those removable whole).

Criteria (``depth_importance``): ``"block_influence"`` (ShortGPT's ``1 - cos`` of the streams around the
branch, one pass over the calibration batches), ``"output_error"`` (SLEB's greedy search: the candidate whose
removal changes the model's output least goes first, then every remaining candidate is measured again with it
removed; one forward per candidate, batch and removal), ``"magnitude"`` (no data: the output projection's norm,
:mod:`fxprune.importance.depth`). Without a criterion: block influence with calibration batches, magnitude
without. Lowest scores go first; a branch inside a removed one (nested residuals) is not counted twice.

The scores come from the stage below (``score``: a function of the candidates, ``error``: a function of the removed
candidates for the greedy search); :func:`fxprune.pipeline.depth_plan` passes the criterion's.

Example::

    >>> plan = fxprune.pipeline.depth_plan(dg, depth={"attention": 0.5}, calibration=batches)
    >>> [b.owner for b in plan.branches]
    ['model.layers.2', 'model.layers.1']
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

CRITERIA = ("block_influence", "output_error", "magnitude")
ALL = "*"  # quota key: any kind


@dataclass
class DepthPlan:
    branches: list = field(default_factory=list)  # Branch objects to remove, in the order chosen
    layers: list = field(default_factory=list)  # Layer objects to remove, in the order chosen
    scores: dict = field(default_factory=dict)  # {candidate: score} (output_error: the first round's errors)
    criterion: str = ""
    forwards: int = 0  # forwards the output-error search ran

    @property
    def removed(self) -> list:
        return self.layers + self.branches

    def __bool__(self) -> bool:
        return bool(self.branches or self.layers)


def check_depth(depth, layers):
    """``(depth, layers)`` after checking them: ``depth`` None, a fraction in [0, 1] or ``{kind: fraction}``;
    ``layers`` None or a non-negative int. Errors name the argument."""
    if depth is not None and layers is not None:
        raise ValueError("give depth (a fraction of the residual branches) or layers (a number of whole layers), "
                         "not both")
    if depth is not None:
        items = depth.items() if isinstance(depth, dict) else [(ALL, depth)]
        for kind, fraction in items:
            if not isinstance(kind, str):
                raise ValueError(f"depth={{kind: fraction}} takes kinds as strings ('attention', 'mlp', 'conv'); "
                                 f"got {kind!r}")
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"depth is a fraction of the residual branches in [0, 1]"
                                 f"{'' if kind == ALL else f' (kind {kind!r})'}; got {fraction!r}")
        depth = {k: float(v) for k, v in depth.items()} if isinstance(depth, dict) else float(depth)
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise ValueError(f"layers is the number of whole layers to remove, a non-negative int; got {layers!r}")
    return depth, layers


def candidates(dg, depth=None, layers=None) -> list:
    """The removable layers (``layers=k``) or removable branches (``depth``)."""
    if layers is not None:
        return [layer for layer in dg.layers if layer.removable]
    return [b for b in dg.branches if b.removable]


def quota(cands: list, depth=None, layers=None) -> dict:
    """``{kind or "*": how many to remove}``."""
    if layers is not None:
        if layers > len(cands):
            raise ValueError(f"layers={layers}: the model has {len(cands)} layers that can be removed whole")
        return {ALL: layers}
    if not isinstance(depth, dict):
        return {ALL: int(depth * len(cands) + 0.5)}
    kinds = sorted({b.kind for b in cands})
    unknown = [k for k in depth if k not in kinds]
    if unknown:
        raise ValueError(f"depth names kinds {unknown} the model has no removable branch of; it has "
                         f"{', '.join(f'{k} ({sum(b.kind == k for b in cands)})' for k in kinds) or 'none'}")
    return {k: int(f * sum(b.kind == k for b in cands) + 0.5) for k, f in depth.items()}


def _kind(candidate) -> str:
    return getattr(candidate, "kind", ALL)


def _open(quotas: dict, taken: dict, candidate) -> bool:
    key = ALL if ALL in quotas else _kind(candidate)
    return key in quotas and taken.get(key, 0) < quotas[key]


def _covered(candidate, chosen_ids: set, by_id: dict) -> bool:
    """Whether a branch sits inside a chosen branch (nested residuals)."""
    inside = getattr(candidate, "inside", None)
    while inside is not None:
        if inside in chosen_ids:
            return True
        inside = getattr(by_id.get(inside), "inside", None)
    return False


def select(cands: list, scores: dict, quotas: dict) -> list:
    """Lowest scores first, up to each kind's quota."""
    by_id = {getattr(c, "id", None): c for c in cands}
    chosen, taken, ids = [], {}, set()
    for c in sorted(cands, key=lambda c: scores[c]):
        if _open(quotas, taken, c) and not _covered(c, ids, by_id):
            chosen.append(c)
            key = ALL if ALL in quotas else _kind(c)
            taken[key] = taken.get(key, 0) + 1
            ids.add(getattr(c, "id", None))
    return chosen


def greedy_removal(cands: list, quotas: dict, error) -> tuple[list, dict]:
    """SLEB's greedy search: repeatedly remove the candidate whose removal (with those chosen so far) gives the
    least ``error(removed)``. Returns ``(chosen in order, {candidate: error when it was first measured})``."""
    by_id = {getattr(c, "id", None): c for c in cands}
    chosen, taken, first = [], {}, {}
    total = sum(quotas.values())
    while len(chosen) < total:
        ids = {getattr(c, "id", None) for c in chosen}
        open_ = [c for c in cands if c not in chosen and _open(quotas, taken, c) and not _covered(c, ids, by_id)]
        if not open_:
            break
        errors = {c: error(chosen + [c]) for c in open_}
        for c, e in errors.items():
            first.setdefault(c, e)
        best = min(open_, key=errors.get)
        chosen.append(best)
        key = ALL if ALL in quotas else _kind(best)
        taken[key] = taken.get(key, 0) + 1
    for c in cands:
        first.setdefault(c, float("inf"))
    return chosen, first


def criterion_for(criterion: str | None, calibration) -> str:
    """The depth criterion asked (checked), or the default: block influence with calibration, magnitude without."""
    criterion = criterion or ("block_influence" if calibration is not None else "magnitude")
    if criterion not in CRITERIA:
        raise ValueError(f"depth_importance must be one of {CRITERIA}, got {criterion!r}")
    if criterion != "magnitude" and calibration is None:
        raise ValueError(f"depth_importance={criterion!r} needs calibration batches: pass calibration=[batch, ...]")
    return criterion


def plan_depth(dg, depth=None, layers=None, criterion: str = "magnitude", score=None, error=None) -> DepthPlan:
    """The branches or layers to remove (see module docstring); an empty plan when nothing is asked.

    ``score(candidates) -> {candidate: score}`` ranks them (lowest removed first); with ``error(removed) -> float``
    instead, the greedy search picks them (``error.forwards``, if it counts them, goes into the plan).
    """
    depth, layers = check_depth(depth, layers)
    if depth is None and layers is None:
        return DepthPlan()
    cands = candidates(dg, depth, layers)
    quotas = quota(cands, depth, layers)
    what = "layers" if layers is not None else "residual branches"
    plan = DepthPlan(criterion=criterion)
    if sum(quotas.values()) == 0:
        if (layers or 0) > 0 or (depth and (not isinstance(depth, dict) or any(depth.values()))):
            kept = [b for b in dg.branches if not b.removable]
            why = f"; {len(kept)} are not removable: {kept[0].reason}" if kept else ""
            warnings.warn(f"fxprune: depth={depth!r} removes no {what}: the model has {len(cands)} removable "
                          f"{what}{why} (see dg.depth_report())", stacklevel=3)
        return plan
    if error is not None:
        chosen, plan.scores = greedy_removal(cands, quotas, error)
        plan.forwards = getattr(error, "forwards", 0)
    else:
        plan.scores = score(cands)
        chosen = select(cands, plan.scores, quotas)
    if layers is not None:
        plan.layers = chosen
    else:
        plan.branches = chosen
    return plan
