"""Groups that must keep more than one unit: a router's experts keep at least top-k of them.

``topk(router_probs, k)`` over an experts axis needs k experts; the rules record it (``r.keep_at_least``) and
the dependency graph puts it on the group (``Group.min_kept``). Plans are trimmed to it here, with a warning
(the highest-scoring units of the removal stay); an explicit removal that breaks it is an error. Example::

    >>> trimmed = keep_minimum({experts: [0, 1, 2]}, {experts: np.array([.1, .2, .3, .4])})
    >>> trimmed[experts]            # 4 experts, top-2: at most 2 go, the lowest-scoring ones
    [0, 1]
"""

from __future__ import annotations

import warnings

import numpy as np

from fxprune.errors import FxPruneError


def keep_minimum(removal: dict, scores: dict | None = None) -> dict:
    """``removal`` with each group's removal cut so that ``group.min_kept`` units stay (lowest scores go first)."""
    out = {}
    for group, units in removal.items():
        units = [int(u) for u in units]
        most = group.units - getattr(group, "min_kept", 1)
        if len(units) > most:
            score = scores.get(group) if scores else None
            order = sorted(units, key=lambda u: float(score[u])) if score is not None else units
            units = sorted(order[:max(most, 0)])
            warnings.warn(f"fxprune: group {group.id} ({group.units} units) keeps at least {group.min_kept} "
                          f"({group.min_kept_reason}); its removal was cut to {len(units)} units", stacklevel=3)
        if units:
            out[group] = np.asarray(units) if isinstance(removal[group], np.ndarray) else units
    return out


def check_minimum(dg, removal: dict) -> None:
    """Raise when an explicit removal leaves a group fewer units than it must keep (top-k's k)."""
    by_id = {g.id: g for g in dg.groups}
    for key, units in removal.items():
        group = by_id[key] if isinstance(key, int) else key
        left = group.units - len({int(u) for u in units})
        if left < getattr(group, "min_kept", 1):
            raise FxPruneError(f"group {group.id} must keep at least {group.min_kept} of its {group.units} units "
                               f"({group.min_kept_reason}); the removal leaves {left}")
