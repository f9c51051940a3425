"""Count ties: groups that must lose units in fixed proportion, because one number states all their widths.

A module that must keep its class cannot always hold the shapes the algebra allows (docs/DESIGN.md, "When a
module cannot hold the new shapes"): one config field (``intermediate_size``) sets the MLP width of every
layer, so every layer's MLP group must lose the same number of units; GPT-2's ``n_embd`` states both the
hidden size and the attention width (heads x 16), so the hidden group loses 16 units for every head a layer
loses. A :class:`CountTie` says so: ``{group: multiplier}``, group ``g`` loses ``k * multiplier[g]`` units for
one ``k`` shared by the tie. Whoever knows such a constraint declares it (``dg.count_ties``; today
:mod:`fxprune.huggingface.portable` for ``portable=True``); every planner honours it through
:func:`honour_ties`, which :func:`fxprune.planning.planner.make_plan` applies to whatever plan it made.

Example: a tie of two MLP groups of 64 units; the global plan took 20 units of one and 4 of the other, so both
lose the mean, 12, rounded to their step of 8::

    >>> tie = CountTie({mlp0: 1, mlp1: 1}, "intermediate_size")
    >>> plan = honour_ties({mlp0: units[:20], mlp1: units[:4]}, [tie], scores, steps={mlp0: 8, mlp1: 8})
    >>> {g: len(u) for g, u in plan.items()}
    {mlp0: 8, mlp1: 8}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fxprune.planning.selection import lowest


@dataclass(eq=False)
class CountTie:
    """Groups that lose ``k * members[group]`` units each, for one shared ``k`` (see module docstring)."""

    members: dict  # {Group: multiplier (int >= 1)}
    reason: str  # what states the widths: "LlamaConfig.intermediate_size", ...

    def quantum(self, steps: dict | None = None) -> int:
        """The smallest ``k`` step that keeps every member's removal a multiple of its own step."""
        steps = steps or {}
        out = 1
        for group, m in self.members.items():
            step = max(1, int(steps.get(group, 1)))
            out = math.lcm(out, step // math.gcd(step, m))
        return out

    def most(self) -> int:
        """The largest ``k``: every member keeps at least ``min_kept`` units (one at least)."""
        return min((g.units - max(1, g.min_kept)) // m for g, m in self.members.items())

    def __repr__(self) -> str:
        parts = ", ".join(f"G{g.id}x{m}" if m != 1 else f"G{g.id}" for g, m in self.members.items())
        return f"CountTie({parts}: {self.reason})"


def tied_k(tie: CountTie, removal: dict, steps: dict | None = None) -> int:
    """The shared ``k`` closest to what ``removal`` asks of the tie's groups: the units they lose together over
    the multipliers summed (a mean weighted by them), rounded to the tie's quantum (a tie rounds down), at most
    :meth:`CountTie.most`; 0 when a member cannot lose units (frozen, or missing from the scores)."""
    asked = sum(len(removal.get(g, ())) for g in tie.members)
    k = asked / sum(tie.members.values())
    q = tie.quantum(steps)
    k = math.ceil(k / q - 0.5) * q
    most = tie.most() // q * q
    return max(0, min(k, most))


def honour_ties(removal: dict, ties, scores: dict, steps: dict | None = None) -> dict:
    """``removal`` with every tie's groups losing ``k * multiplier`` units (their lowest scores first).

    Groups outside every tie keep their removal. A tie with a member that has no scores (the criterion had no
    opinion, or the group is frozen) loses nothing: its other members stay whole too.
    """
    out = dict(removal)
    for tie in ties or ():
        if any(g not in scores or not g.prunable for g in tie.members):
            k = 0
        else:
            k = tied_k(tie, removal, steps)
        for group, m in tie.members.items():
            out.pop(group, None)
            if k:
                out[group] = lowest(np.asarray(scores[group]), k * m)
    return out


def check_ties(removal: dict, ties) -> list[str]:
    """The ties an explicit removal (``fxprune.apply``) breaks, as sentences; empty when it keeps them all."""
    problems = []
    for tie in ties or ():
        counts = {g: len(removal.get(g, ())) for g in tie.members}
        ks = {counts[g] / m for g, m in tie.members.items()}
        if len(ks) > 1:
            described = ", ".join(f"G{g.id} loses {counts[g]}" + (f" (x{m})" if m != 1 else "")
                                  for g, m in tie.members.items())
            problems.append(f"{tie.reason}: {described}")
    return problems
