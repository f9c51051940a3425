"""The public entry points and the pipeline they run: one flat list of named passes.

::

    capture -> propagate -> decompose -> relate -> solve     (analyze)
            -> score -> plan -> rewrite -> verify -> measure -> record     (prune)

``score`` runs the importance criterion over every prunable group
(:mod:`fxprune.importance`); ``plan`` turns scores into units to remove (local or
global ranking, per-module ratios, round_to; with ``target_macs``/``target_params``
it searches the ratio, counting each candidate plan without rewriting:
:mod:`fxprune.target`); ``measure`` counts the pruned graph when a target was set.

Each pass reads and writes a :class:`Job`; analysis results live in
``node.meta`` (``"val"``: FakeTensor; ``"fxprune_rule"``: the rule that
related the node) and in the :class:`~fxprune.depgraph.DependencyGraph`.

Example::

    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5,
    ...                        example_inputs=(torch.randn(1, 3, 224, 224),))
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune import hf
from fxprune.capture import capture, flat_inputs, inline_mode_regions, is_hf_model
from fxprune.decompose import decompose
from fxprune.depgraph import DependencyGraph
from fxprune.importance import named_tensors, resolve_importance, score_groups
from fxprune.macs import count_graph, estimate
from fxprune.plan import make_plan
from fxprune.plan_io import PruningPlan, attach_plan
from fxprune.propagate import propagate
from fxprune.ratios import check_ratio, group_ratios
from fxprune.relate import relate
from fxprune.rewrite import rewrite
from fxprune.target import METRICS, search_ratio
from fxprune.verify import output_shapes, verify


@dataclass
class Job:
    model: object
    example_inputs: object = None
    kwargs: dict | None = None
    ratio: float = 0.0
    importance: object = "l2"
    ignore: tuple = ()
    round_to: int | None = None
    inplace: bool = False
    gm: fx.GraphModule | None = None
    state: object = None
    dg: DependencyGraph | None = None
    scores: dict = field(default_factory=dict)
    removal: dict = field(default_factory=dict)
    flat_inputs: tuple | None = None
    expected_shapes: list | None = None
    result: fx.GraphModule | None = None
    global_pruning: bool = False
    max_ratio: float = 0.9
    ratios: dict | None = None  # {module name | module | group | group id: ratio}
    target: tuple | None = None  # ("macs" | "params", fraction of the original kept)
    calibration: object = None  # batches for gradient criteria
    loss_fn: object = None
    search: object = None  # target.SearchResult when a target was searched
    achieved: dict = field(default_factory=dict)  # {"macs": fraction kept, "params": ...} when a target was set


def _capture(job: Job) -> None:
    # pruned in place, a Hugging Face model keeps its own forward: the graph is analysed, never returned
    gm = capture(job.model, job.example_inputs, job.kwargs, dynamic=not (job.inplace and is_hf_model(job.model)))
    if gm is job.model:  # never edit the caller's graph: a fresh graph over the same modules
        fresh = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
        fresh.meta.update(gm.meta)
        gm = fresh
        inline_mode_regions(gm)  # a graph the caller exported may hold no_grad / autocast regions
    job.gm = gm
    job.flat_inputs = flat_inputs(gm, job.example_inputs, job.kwargs)


def _propagate(job: Job) -> None:
    propagate(job.gm, job.flat_inputs)
    job.expected_shapes = output_shapes(job.gm)


def _decompose(job: Job) -> None:
    if decompose(job.gm):
        propagate(job.gm, job.flat_inputs)


def _relate(job: Job) -> None:
    job.state = relate(job.gm)


def _solve(job: Job) -> None:
    ignore = _ignored_keys(job.gm, job.state, job.ignore)
    dg = job.dg = DependencyGraph(job.gm, job.state, job.flat_inputs, ignore)
    dg.expected_shapes = job.expected_shapes
    dg.model, dg.model_inputs, dg.model_kwargs = job.model, job.example_inputs, job.kwargs
    if job.inplace and is_hf_model(job.model):
        hf.freeze_head_dims(dg, job.model)


def _score(job: Job) -> None:
    criterion = resolve_importance(job.importance, job.calibration, job.loss_fn)
    job.scores = score_groups(criterion, job.dg, job.dg.prunable_groups)


def _plan(job: Job) -> None:
    groups, fixed = job.dg.prunable_groups, group_ratios(job.dg, job.ratios)

    def plan_for(ratio: float) -> dict:
        return make_plan(groups, job.scores, ratio, round_to=job.round_to, global_pruning=job.global_pruning,
                         max_ratio=job.max_ratio, fixed=fixed)

    if job.target is None:
        job.removal = plan_for(job.ratio)
    else:
        job.search = search_ratio(job.dg, plan_for, *job.target)
        job.removal, job.ratio = job.search.removal, job.search.ratio


def _rewrite(job: Job) -> None:
    if job.inplace and is_hf_model(job.model):  # rewritten, verified and written back in one step
        job.result = hf.prune_in_place(job.dg, job.removal, rewrite, verify)
    else:
        job.result = rewrite(job.dg, job.removal, inplace=job.inplace)


def _verify(job: Job) -> None:
    if not (job.inplace and is_hf_model(job.model)):
        verify(job.result, job.dg.example_inputs, job.dg.expected_shapes)


def _measure(job: Job) -> None:
    """With a target: count the pruned graph for real; warn when it is more than 2% (relative) off the target."""
    if job.target is None:
        return
    metric, fraction = job.target
    before = count_graph(job.dg.gm)
    outputs = job.result.graph.find_nodes(op="output") if isinstance(job.result, fx.GraphModule) else []
    if outputs and all("val" in n.meta for n in outputs):
        after = count_graph(job.result)
    else:  # pruned in place (Hugging Face): the plan's count is exact
        after = estimate(job.dg, job.removal)
    job.achieved = {m: after[i] / before[i] if before[i] else 1.0 for i, m in enumerate(METRICS)}
    if abs(job.achieved[metric] - fraction) > 0.02 * fraction:
        warnings.warn(f"fxprune: target_{metric}={fraction} reached {job.achieved[metric]:.3f} of the original "
                      f"{metric} (groups too coarse, or too much of the model frozen)", stacklevel=3)


def _record_plan(job: Job) -> None:
    """Keep the removal plan on the result (``gm.meta["fxprune_plan"]``) so that it can be saved and replayed."""
    settings = {"ratio": job.ratio, "importance": job.importance, "round_to": job.round_to}
    attach_plan(job.result, PruningPlan.from_removal(job.dg, job.removal, inplace=job.inplace, settings=settings))


ANALYSIS = [("capture", _capture), ("propagate", _propagate), ("decompose", _decompose), ("relate", _relate),
            ("solve", _solve)]
PRUNING = [("score", _score), ("plan", _plan), ("rewrite", _rewrite), ("verify", _verify), ("measure", _measure),
           ("record", _record_plan)]
PIPELINE = ANALYSIS + PRUNING


def run(job: Job, passes) -> Job:
    for _name, fn in passes:
        fn(job)
    return job


def analyze(model, example_inputs=None, *, kwargs=None, ignore=(), inplace: bool = False) -> DependencyGraph:
    """Capture ``model`` and build its dependency graph (groups, members, frozen reasons).

    ``inplace=True`` prepares a later ``apply(dg, ..., inplace=True)`` on a Hugging
    Face model: groups its modules cannot express (head dims) are frozen.
    """
    return run(Job(model, example_inputs, kwargs, ignore=tuple(ignore), inplace=inplace), ANALYSIS).dg


def apply(dg: DependencyGraph, removal: dict, *, inplace: bool = False) -> fx.GraphModule:
    """Remove exactly the given units ``{group (or its id): unit indices}``; verified before returning.

    With ``inplace=True`` on a Hugging Face model (analysed with ``inplace=True``
    so that head dims are kept), the model itself is pruned and returned.
    """
    if inplace and is_hf_model(getattr(dg, "model", None)):
        gm = hf.prune_in_place(dg, removal, rewrite, verify)
    else:
        gm = rewrite(dg, removal, inplace=inplace)
        verify(gm, dg.example_inputs, dg.expected_shapes)
    attach_plan(gm, PruningPlan.from_removal(dg, removal, inplace=inplace))
    return gm


def prune(model, ratio: float | None = None, *, example_inputs=None, kwargs=None, importance="l2", ignore=(),
          round_to=None, inplace: bool = False, global_pruning: bool = False, max_ratio: float = 0.9,
          ratios: dict | None = None, target_macs: float | None = None, target_params: float | None = None,
          calibration=None, loss_fn=None) -> fx.GraphModule:
    """Remove ``ratio`` (default 0.3) of the units of every prunable group; returns a verified GraphModule.

    ``model`` is an ``nn.Module`` (traced here) or a ``torch.fx.GraphModule``.
    ``ignore`` lists modules, module names or parameter names whose axes must not
    change. Without ``inplace=True`` the caller's model is left untouched. With
    ``inplace=True`` a Hugging Face model is pruned in place and returned (it
    still generates, saves and reloads; see :mod:`fxprune.hf`).

    ``importance``: a name (``"l2"``, ``"l1"``, ``"lamp"``, ``"fpgm"``, ``"bn_scale"``,
    ``"taylor"``, ``"hessian"``, ``"random"``), a criterion object or a callable (see
    :mod:`fxprune.importance`); ``"taylor"``/``"hessian"`` need ``calibration`` batches
    and ``loss_fn(model, batch)`` (default: cross-entropy of ``(inputs, targets)`` batches).
    ``global_pruning=True`` ranks units of all groups together (at most ``max_ratio``
    of one group). ``ratios={"layer4": 0.7, model.fc: 0.0}`` sets ratios per module or group.
    ``target_macs=0.5`` (or ``target_params``) searches the ratio that keeps that fraction.

    Example::

        >>> pruned = fxprune.prune(model, example_inputs=(x,), target_macs=0.5, round_to=8)
    """
    job = Job(model, example_inputs, kwargs, importance=importance, ignore=tuple(ignore), round_to=round_to,
              inplace=inplace, global_pruning=bool(global_pruning), ratios=ratios, calibration=calibration,
              loss_fn=loss_fn)
    job.ratio, job.target, job.max_ratio = check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio)
    return run(job, PIPELINE).result


def check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio) -> tuple:
    """``(ratio, target, max_ratio)`` after checking them; errors name the bad argument."""
    targets = [(m, v) for m, v in (("macs", target_macs), ("params", target_params)) if v is not None]
    if len(targets) > 1:
        raise ValueError("give target_macs or target_params, not both")
    if targets and ratio is not None:
        raise ValueError(f"give ratio or target_{targets[0][0]}, not both (the ratio is searched for the target)")
    target = None
    if targets:
        metric, fraction = targets[0]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"target_{metric} is the fraction of the original {metric} to keep, in (0, 1]; "
                             f"got {fraction!r}")
        target = (metric, float(fraction))
    ratio = check_ratio(0.3 if ratio is None else ratio)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0.0 < max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    return ratio, target, float(max_ratio)


def _ignored_keys(gm: fx.GraphModule, state, ignore) -> list[tuple]:
    """(tensor key, reason) for every parameter or buffer named by ``ignore``."""
    module_names = {id(m): name for name, m in gm.named_modules()}
    tensors = named_tensors(gm)
    out = []
    for item in ignore:
        if isinstance(item, torch.nn.Module):
            if id(item) not in module_names:
                raise ValueError(f"ignore: module {type(item).__name__} is not part of the model")
            prefix = module_names[id(item)]
        elif isinstance(item, str):
            prefix = item
        else:
            raise TypeError(f"ignore takes modules, module names or parameter names, got {type(item).__name__}")
        names = [n for n in tensors if n == prefix or n.startswith(prefix + ".") or prefix == ""]
        if not names:
            raise ValueError(f"ignore: no parameter or buffer named {prefix!r} (or inside a module of that name)")
        out.extend((state.param_key(n), f"ignored by the caller ({item if isinstance(item, str) else prefix})")
                   for n in names)
    return out
