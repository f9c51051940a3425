"""Combining per-member scores into one group score, and normalising a group's scores.

Reductions (across the members of a group): ``"sum"`` (the paper's group
importance), ``"mean"``, ``"max"``, ``"prod"``.

Normalisations (of one group's scores, so that groups of different sizes and
scales can be ranked together): ``None``, ``"mean"`` (divide by the mean),
``"max"``, ``"sum"``, ``"standardization"`` ((s - mean) / std) and ``"lamp"``
(LAMP: a unit's score over the sum of the scores not below it).

Example::

    >>> reduce_members([np.array([1., 4.]), np.array([3., 0.])], "sum")
    array([4., 4.])
    >>> normalize(np.array([1., 2., 3.]), "lamp")      # 1/6, 2/5, 3/3
    array([0.16666667, 0.4       , 1.        ])
"""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("sum", "mean", "max", "prod")
NORMALIZERS = (None, "mean", "max", "sum", "standardization", "lamp")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    return reduction


def check_normalizer(normalizer):
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {list(NORMALIZERS)}")
    return normalizer


def reduce_members(per_member: list[np.ndarray], reduction: str) -> np.ndarray:
    stacked = np.stack(per_member)
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "mean":
        return stacked.mean(0)
    if reduction == "max":
        return stacked.max(0)
    return stacked.prod(0)


def normalize(scores: np.ndarray, normalizer) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if normalizer is None:
        return scores
    if normalizer == "lamp":
        return _lamp(scores)
    if normalizer == "standardization":
        std = scores.std()
        return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)
    scale = {"mean": scores.mean, "max": scores.max, "sum": scores.sum}[normalizer]()
    return scores / scale if scale > 0 else scores


def _lamp(scores: np.ndarray) -> np.ndarray:
    """LAMP (Lee et al., 2021): score / sum of the scores ranked at or above it."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    tail = np.cumsum(ranked[::-1])[::-1]
    out = np.empty_like(scores)
    out[order] = np.divide(ranked, tail, out=np.zeros_like(ranked), where=tail > 0)
    return out
