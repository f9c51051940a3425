"""Groups that must keep more than one unit: a router's experts keep at least top-k of them.

``topk(router_probs, k)`` over an experts axis needs k experts; the rules record it (``r.keep_at_least``) and
the dependency graph puts it on the group (``Group.min_kept``). Plans are trimmed to it here, with a warning
(the highest-scoring units of the removal stay); an explicit removal that breaks it is a ``PlanError``
(``rewrite``). Example::

    >>> trimmed = keep_minimum({experts: [0, 1, 2]}, {experts: np.array([.1, .2, .3, .4])})
    >>> trimmed[experts]            # 4 experts, top-2: at most 2 go, the lowest-scoring ones
    array([0, 1])
"""

from __future__ import annotations

import warnings

import numpy as np


def keep_minimum(removal: dict, scores: dict | None = None) -> dict:
    """``removal`` with each group's removal cut so that ``group.min_kept`` units stay (lowest scores go first)."""
    out = {}
    for group, units in removal.items():
        most = group.units - group.min_kept
        if len(units) <= most:
            out[group] = units
            continue
        score = scores.get(group) if scores else None
        order = sorted((int(u) for u in units), key=lambda u: float(score[u]) if score is not None else 0.0)
        out[group] = np.sort(np.asarray(order[:max(most, 0)], dtype=np.int64))
        warnings.warn(f"fxprune: group G{group.id} ({group.units} units) keeps at least {group.min_kept} "
                      f"({group.min_kept_reason}); its removal was cut to {len(out[group])} units", stacklevel=3)
    return out
