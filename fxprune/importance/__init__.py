"""Score: importance of every unit of a group, estimated over the whole group (DepGraph's group importance).

Criteria by name (``fxprune.prune(..., importance=NAME)``):

============  ===============================================================
``"l2"``      squared L2 norm of everything a unit's removal deletes, summed
              over the group's parameters (default); ``"l1"`` the same with |w|
``"lamp"``    group L2 with LAMP normalisation
``"fpgm"``    distance to the other units (geometric median, FPGM)
``"bn_scale"``  |gamma| of the group's BatchNorms (network slimming; alias ``"slimming"``)
``"taylor"``  first-order Taylor |w * grad| (needs ``calibration`` batches and a ``loss_fn``)
``"hessian"`` diagonal Hessian / OBD: 0.5 w^2 E[grad^2] (needs ``calibration``)
``"activation"``  FLAP fluctuation Var(x_j) ||W[:, j]||^2 over the input columns of Linear/conv consumers
              (needs ``calibration`` batches of inputs; :mod:`fxprune.calibration`)
``"wanda"``   ||x_j|| ||W[:, j]||_1 over the same columns (needs ``calibration``)
``"obs"``     structured Optimal Brain Surgeon: the consumers' output error after removing the unit's
              columns and refitting the rest, from the inverse input Gram (needs ``calibration``)
``"obs-output"``  the same in units of the model's output (each consumer's error weighed by the output's
              sensitivity to it), units removed greedily: comparable across layers, for
              ``global_pruning=True, isomorphic=True`` (needs ``calibration``)
``"random"``  a baseline
============  ===============================================================

or an object (:class:`Magnitude` with ``reduction``/``normalizer``, :class:`Taylor`, ...),
or any callable ``f(group, weights) -> scores`` where ``weights`` maps ``"name[dim]"`` of every
parameter member to a ``(units, k)`` matrix whose row u is what removing unit u deletes. The
form ``f(dg, group, tensors)`` (tensors by name) is accepted too.

The criteria that read calibration batches of model inputs (``"activation"``, ``"wanda"``, ``"obs"``) live in
:mod:`fxprune.calibration` and register their names here (:func:`register_criterion`). This package may import
``fxprune.errors``, ``fxprune.modules``, ``fxprune.algebra``, ``fxprune.rules`` and ``fxprune.analysis``; never
calibration, planning or anything that runs the pipeline.

Example::

    >>> fxprune.prune(model, 0.5, example_inputs=(x,),
    ...               importance=lambda group, weights: sum(w.norm(dim=1) for w in weights.values()))
"""

from __future__ import annotations

import inspect

import torch

from fxprune.importance.base import Criterion, as_scores
from fxprune.importance.bn_scale import BNScale
from fxprune.importance.loss_gradients import calibrate, classification_loss
from fxprune.importance.fpgm import FPGM
from fxprune.importance.gradient import Hessian, Taylor
from fxprune.importance.magnitude import LAMP, Magnitude, unit_scores
from fxprune.importance.random_order import Random
from fxprune.importance.reduce import normalize, reduce_members
from fxprune.importance.slices import parameter_slices, unit_indices, unit_matrix

_BY_NAME = {
    "l2": lambda: Magnitude(2), "l1": lambda: Magnitude(1), "lamp": LAMP, "fpgm": FPGM, "random": Random,
    "bn_scale": BNScale, "slimming": BNScale,
}
_NEEDS_DATA = {"taylor": Taylor, "hessian": Hessian}
# calibration batches of model inputs, no loss: {name: criterion class}, filled by register_criterion
_NEEDS_INPUTS: dict[str, type] = {}
CRITERIA = sorted(list(_BY_NAME) + list(_NEEDS_DATA))  # every name; the registered ones are added in place


def register_criterion(name: str):
    """Class decorator: ``importance=name`` builds ``cls(calibration, progress=progress)``.

    For criteria that read calibration batches of model inputs (``"activation"``, ``"wanda"``, ``"obs"``). They
    live with the statistics they read, in :mod:`fxprune.calibration`, which builds on this package; so they
    register themselves here, as rules do in :mod:`fxprune.rules.registry`, and this package never imports
    calibration. Importing ``fxprune`` imports both, so every name is known before the first ``prune``.

    Example::

        >>> @register_criterion("wanda")
        ... class Wanda(ActivationCriterion): ...
        >>> type(resolve_importance("wanda", calibration=batches)).__name__
        'Wanda'
    """
    def register(cls: type) -> type:
        if name in CRITERIA:
            raise ValueError(f"importance {name!r} is taken (by {_NEEDS_INPUTS.get(name, 'a built-in criterion')})")
        _NEEDS_INPUTS[name] = cls
        CRITERIA.append(name)
        CRITERIA.sort()
        return cls

    return register


class UserCriterion(Criterion):
    """Adapts ``f(group, weights)`` (slice matrices by member) or ``f(dg, group, tensors)``."""

    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", type(fn).__name__)
        self.takes_slices = _positional_count(fn) == 2

    def score(self, dg, group, tensors):
        if self.takes_slices:
            return self.fn(group, parameter_slices(group, tensors))
        return self.fn(dg, group, tensors)


def resolve_importance(importance, calibration=None, loss_fn=None, progress=None) -> Criterion:
    """A :class:`Criterion` from a name, a criterion object or a user callable."""
    if isinstance(importance, Criterion):
        return importance
    if isinstance(importance, str):
        if importance in _NEEDS_DATA:
            if calibration is None:
                raise ValueError(f"importance={importance!r} needs calibration batches: pass calibration=[...] "
                                 f"(and loss_fn=f(model, batch) unless batches are (inputs, targets))")
            return _NEEDS_DATA[importance](calibration, loss_fn, progress=progress)
        if importance in _NEEDS_INPUTS:
            return _NEEDS_INPUTS[importance](calibration, progress=progress)
        if importance in _BY_NAME:
            return _BY_NAME[importance]()
        raise ValueError(f"unknown importance {importance!r}; choose one of {CRITERIA}, a Criterion or a callable")
    if callable(importance):
        if _positional_count(importance) not in (2, 3):
            raise TypeError(f"an importance callable takes (group, weights) or (dg, group, tensors); "
                            f"{getattr(importance, '__name__', importance)!r} takes {_positional_count(importance)}")
        return UserCriterion(importance)
    raise TypeError(f"importance must be a name, a Criterion or a callable, got {type(importance).__name__}")


def score_groups(criterion: Criterion, dg, groups) -> dict:
    """``{group: scores}`` for every group the criterion has an opinion on (``None`` results are left out)."""
    return dict(iter_scores(criterion, dg, groups))


def iter_scores(criterion: Criterion, dg, groups):
    """``(group, scores)`` one group at a time, the criterion prepared once (calibration runs before the first)."""
    criterion.prepare(dg)
    tensors = named_tensors(dg.gm)
    for group in groups:
        with torch.no_grad():
            scores = as_scores(criterion(dg, group, tensors), group, repr(criterion))
        if scores is not None:
            yield group, scores


def named_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (tied tensors appear under each)."""
    out = dict(gm.named_buffers(remove_duplicate=False))
    out.update(dict(gm.named_parameters(remove_duplicate=False)))
    return out


def _positional_count(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


__all__ = [
    "BNScale", "CRITERIA", "Criterion", "FPGM", "Hessian", "LAMP", "Magnitude", "Random", "Taylor", "UserCriterion",
    "as_scores", "calibrate", "classification_loss", "named_tensors", "normalize", "parameter_slices",
    "reduce_members", "register_criterion", "resolve_importance", "score_groups", "unit_indices", "unit_matrix",
    "unit_scores",
]

