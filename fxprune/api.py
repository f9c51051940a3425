"""The public entry points and the pipeline they run: one flat list of named passes.

::

    capture -> propagate -> decompose -> relate -> solve     (analyze)
            -> score -> plan -> check -> [refit] -> rewrite -> recompose -> [reconstruct] -> [sequential]
            -> [reestimate_bn] -> verify -> measure -> record     (prune)

``score`` runs the importance criterion over every prunable group
(:mod:`fxprune.importance`); ``plan`` turns scores into units to remove (local or
global ranking, per-module ratios, round_to; with ``target_macs``/``target_params``
it searches the ratio, counting each candidate plan without rewriting:
:mod:`fxprune.planning.target`; global pruning towards such a target ranks units by score per
MAC or parameter saved, scores normalised per group type: :mod:`fxprune.planning.costs`; with
``isomorphic=True`` each class of same-structure groups is ranked on its own and loses the ratio:
:mod:`fxprune.planning.isomorphic`);
``check`` warns when the plan removes far less than the ratio
(frozen groups, with their reasons); with ``reconstruct=True``, ``refit`` solves the least-squares refit
of every Linear, weight matmul/addmm or convolution that loses input columns from calibration statistics of
the original model and ``reconstruct`` writes it into the pruned graph, or into the Hugging Face model pruned in
place (:mod:`fxprune.calibration`); with ``sequential=True``,
``sequential`` refits those consumers again front to back, stage by stage, on the pruned graph's own inputs
(:mod:`fxprune.calibration.sequential`); with ``reestimate_bn=True``, ``reestimate_bn`` re-estimates the
pruned graph's BatchNorm running statistics on the calibration batches; ``measure`` counts the
pruned graph when a target was set.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune.huggingface import inplace as hf_inplace
from fxprune.capture import (EXPORTED, capture, flat_inputs, inline_mode_regions, is_hf_model, keep_user_attributes,
                             module_names, name_of_key, split_inputs)
from fxprune.decompose import decompose, recompose
from fxprune.depgraph import DependencyGraph
from fxprune.importance import named_tensors, resolve_importance, score_groups
from fxprune.macs import count_graph, estimate
from fxprune.planning.alignment import default_alignment, removal_steps
from fxprune.planning.costs import group_types
from fxprune.planning.isomorphic import class_ids
from fxprune.planning.latency_target import search_latency
from fxprune.planning.minimum import keep_minimum
from fxprune.planning.selection import make_plan, units_to_keep
from fxprune.plan_io import PruningPlan, attach_plan
from fxprune.propagate import propagate, reuse_export_values
from fxprune.planning.ratios import check_ratio, group_ratios
from fxprune.shapes import GraphShapes, PlannedShapes
from fxprune.relate import relate
from fxprune.rewrite import rewrite
from fxprune.planning.target import METRICS, search_by_cost, search_ratio
from fxprune.untie import untie_constants
from fxprune.verify import output_shapes, verify


@dataclass
class Job:
    model: object
    example_inputs: object = None
    kwargs: dict | None = None
    ratio: float = 0.0
    importance: object = "l2"
    ignore: tuple = ()
    round_to: int | None = None  # channel alignment; None: chosen from the model's device and dtype
    prune_head_dims: bool = False  # prune attention's per-head widths too (off: SDPA keeps its fused kernels)
    alignment: int = 1  # the channel alignment the plan used (resolved from round_to)
    steps: dict = field(default_factory=dict)  # {group: units it loses at a time} that keep aligned widths aligned
    inplace: bool = False
    gm: fx.GraphModule | None = None
    state: object = None
    dg: DependencyGraph | None = None
    scores: dict = field(default_factory=dict)
    removal: dict = field(default_factory=dict)
    flat_inputs: tuple | None = None
    fresh_export: bool = False  # capture exported the model from these very inputs: propagate may keep its shapes
    reused_shapes: bool = False  # propagate kept the export's shapes (static) instead of propagating again
    expected_shapes: list | None = None
    result: fx.GraphModule | None = None
    global_pruning: bool = False
    isomorphic: bool = False  # global ranking within each class of isomorphic groups (planning/isomorphic.py)
    max_ratio: float = 0.9
    ratios: dict | None = None  # {module name | module | group | group id: ratio}
    target: tuple | None = None  # ("macs" | "params", fraction of the original kept)
    calibration: object = None  # batches for gradient and activation criteria and for reconstruction
    reconstruct: bool = False  # refit the consumers of pruned units on calibration statistics
    refit: dict = field(default_factory=dict)  # {parameter name: refit tensor} when reconstructing
    plan_normalizer: object = "mean"  # how a global plan puts groups' scores on one scale (the criterion says)
    refit_report: dict = field(default_factory=dict)  # {"one-shot"/"sequential": {weight: chosen ridge strength}}
    sequential: bool = False  # refit front to back on the pruned model's inputs (needs reconstruct)
    sequential_plan: object = None  # calibration.SequentialPlan, read before rewriting
    reestimate_bn: bool = False  # re-estimate BatchNorm running statistics of the pruned model
    loss_fn: object = None
    search: object = None  # target.SearchResult when a target was searched
    achieved: dict = field(default_factory=dict)  # {"macs": fraction kept, "params": ...} when a target was set


def _capture(job: Job) -> None:
    job.example_inputs, job.kwargs = split_inputs(job.example_inputs, job.kwargs)
    # pruned in place, a Hugging Face model keeps its own forward: the graph is analysed, never returned, so
    # static sizes do (half the export time), unless calibration batches of other sizes must run through it
    static = job.inplace and is_hf_model(job.model) and job.calibration is None
    gm = capture(job.model, job.example_inputs, job.kwargs, dynamic=not static)
    job.fresh_export = gm is not job.model and gm.meta.get("fxprune_capture") == EXPORTED
    if gm is job.model:  # never edit the caller's graph: a fresh graph over the same modules
        fresh = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
        fresh.meta.update(gm.meta)
        keep_user_attributes(gm, fresh)
        gm = fresh
        inline_mode_regions(gm)  # a graph the caller exported may hold no_grad / autocast regions
    job.gm = gm
    job.flat_inputs = flat_inputs(gm, job.example_inputs, job.kwargs)


def _propagate(job: Job) -> None:
    # a static export already traced these inputs: its shapes are the ones propagation would compute
    job.reused_shapes = job.fresh_export and reuse_export_values(job.gm)
    if not job.reused_shapes:
        propagate(job.gm, job.flat_inputs)
    job.expected_shapes = output_shapes(job.gm)


def _decompose(job: Job) -> None:
    if decompose(job.gm):
        propagate(job.gm, job.flat_inputs)


def _relate(job: Job) -> None:
    free = hf_inplace.internal_outputs(job.gm) if job.inplace and is_hf_model(job.model) else set()
    job.state = relate(job.gm, free)
    if free:
        job.expected_shapes = output_shapes(job.gm, free)


def _solve(job: Job) -> None:
    dg = job.dg = _dependency_graph(job)
    # ALiBi slopes computed once for every layer tie all layers' heads: where that tie is all that holds such a
    # prunable axis together, each consumer gets its own copy and the graph is related again (not in place,
    # where these axes freeze: the model recomputes them)
    shared = [node for layout, node in dg.state.sliced_constants
              if any(g.prunable for g in dg.groups_of_layout(layout))]
    if shared and not (job.inplace and is_hf_model(job.model)) and untie_constants(job.gm, shared):
        _relate(job)
        dg = job.dg = _dependency_graph(job)
    dg.expected_shapes = job.expected_shapes
    dg.model, dg.model_inputs, dg.model_kwargs = job.model, job.example_inputs, job.kwargs
    if not job.prune_head_dims:
        dg.keep_head_dims()
    if job.inplace and is_hf_model(job.model):
        hf_inplace.freeze_head_dims(dg, job.model)
        hf_inplace.freeze_computed_constants(dg)


def _dependency_graph(job: Job) -> DependencyGraph:
    ignore = _ignored_keys(job.gm, job.state, job.ignore, job.model)
    return DependencyGraph(job.gm, job.state, job.flat_inputs, ignore)


def _score(job: Job) -> None:
    if job.reconstruct:  # one pass feeds the refit and an activation criterion on the same batches (cached on dg)
        from fxprune.calibration import collect_statistics

        collect_statistics(job.dg, job.calibration, gram=True)
    criterion = resolve_importance(job.importance, job.calibration, job.loss_fn)
    job.scores = score_groups(criterion, job.dg, job.dg.prunable_groups)
    # a criterion whose scores are on one scale across groups (in units of the model's output) is ranked as it is
    job.plan_normalizer = getattr(criterion, "plan_normalizer", "mean")


def _plan(job: Job) -> None:
    groups, fixed = job.dg.prunable_groups, group_ratios(job.dg, job.ratios)
    job.alignment = job.round_to if job.round_to is not None else default_alignment(job.model)
    job.steps = removal_steps(job.dg, groups, job.alignment)

    def plan_for(ratio: float, costs: dict | None = None) -> dict:
        return make_plan(groups, job.scores, ratio, steps=job.steps, global_pruning=job.global_pruning,
                         max_ratio=job.max_ratio, fixed=fixed, costs=costs, types=types, classes=classes,
                         normalizer=job.plan_normalizer)

    types = None
    # isomorphic: each class of same-structure groups loses the ratio, so a target searches that one ratio
    classes = class_ids(job.dg, groups) if job.isomorphic else None
    if job.target is not None and job.global_pruning and job.target[0] in METRICS and not job.isomorphic:
        # by cost: the units that lose least score per MAC (parameter) saved; the ratio is a fraction of the cost
        ranked = [g for g in groups if g in job.scores and g not in fixed]
        types = group_types(job.dg, ranked)
        job.search = search_by_cost(job.dg, ranked, plan_for, *job.target, steps=job.steps)
        job.removal, job.ratio = job.search.removal, job.search.ratio
    elif job.target is None:
        job.removal = plan_for(job.ratio)
    elif job.target[0] == "latency":
        job.search = search_latency(job.dg, groups, job.scores, job.steps, job.target[1],  # inputs split by capture
                                    lambda removal: _rewritten(job.dg, removal), job.model,
                                    tuple(job.example_inputs), job.kwargs,
                                    alignment=job.alignment, max_ratio=job.max_ratio)
        job.removal = job.search.removal
    else:
        job.search = search_ratio(job.dg, plan_for, *job.target)
        job.removal, job.ratio = job.search.removal, job.search.ratio
    job.removal = keep_minimum(job.removal, job.scores)  # a router keeps its top-k experts


def _check_removed(job: Job) -> None:
    """Warn when the plan removes nothing, or less than half of the asked ratio of the parameters because
    groups are frozen for other reasons than graph inputs/outputs, kernel/vocabulary axes and ``ignore``, or
    hold back units to keep their widths aligned."""
    if job.target is not None or job.ratios or job.ratio <= 0:
        return  # a target is checked by measure; per-module ratios ask for no single ratio
    before = GraphShapes(job.dg.gm).parameter_count()
    removed = 1 - PlannedShapes(job.dg, job.removal).parameter_count() / before if before else 0.0
    count, reasons = job.dg.frozen_reasons()
    # groups that lose fewer units than the ratio asks because their aligned widths move in steps
    held = sum(units_to_keep(g.units, job.ratio, step) > units_to_keep(g.units, job.ratio)
               for g, step in job.steps.items() if step > 1)
    if removed <= 0 or (removed < 0.5 * job.ratio and (count or held)):
        whys = [f"{count} groups frozen: {'; '.join(reasons)}"] if count else []
        if held:
            whys.append(f"{held} groups keep more units so that their widths stay multiples of {job.alignment} "
                        "channels (round_to=1 turns alignment off)")
        why = "; ".join(whys) or "groups too small for the ratio"
        warnings.warn(f"fxprune removed {removed:.0%} of the parameters where ratio {job.ratio:g} was asked: "
                      f"{why} (see dg.report())", stacklevel=4)


def _refit(job: Job) -> None:
    """With ``reconstruct=True``: the ridge refit of each calibrated consumer's (Linear, weight matmul/addmm,
    convolution) kept
    columns and bias, from the original weights (before rewriting, which may edit them in place)."""
    if job.reconstruct:
        from fxprune.calibration import refit_consumers

        job.refit = refit_consumers(job.dg, job.removal, job.calibration,
                                    report=job.refit_report.setdefault("one-shot", {}))
        if job.sequential:  # the original graph and weights are the targets: read them before rewriting
            from fxprune.calibration import plan_sequential

            job.sequential_plan = plan_sequential(job.dg, job.removal, inplace=job.inplace)


def _rewrite(job: Job) -> None:
    if job.inplace and is_hf_model(job.model):  # rewritten, verified and written back in one step
        job.result = hf_inplace.prune_in_place(job.dg, job.removal, rewrite, verify)
    else:
        job.result = rewrite(job.dg, job.removal, inplace=job.inplace)


def _recompose(job: Job) -> None:
    """Decomposed ``nn.MultiheadAttention`` calls become module calls again (resized), to keep the fused path."""
    if not (job.inplace and is_hf_model(job.model)):
        recompose(job.result)


def _reconstruct(job: Job) -> None:
    """Write the refit weights into the pruned graph (rewriting keeps parameter names), or into a Hugging Face
    model pruned in place: its resized tensors were written back under the exported graph's names, which are
    the model's own parameter names (a refit consumer without a bias gets none)."""
    if job.refit:
        from fxprune.calibration import load_refit

        load_refit(job.result, job.refit)
    if job.refit_report:
        from fxprune.calibration.reconstruct import attach_refit_report

        attach_refit_report(job.result, job.refit_report)


def _sequential(job: Job) -> None:
    """With ``sequential=True``: refit the consumers stage by stage on the pruned graph's own inputs (a consumer
    whose call is not a node of the pruned graph, such as a recomposed attention's, keeps the one-shot refit)."""
    if job.sequential_plan is not None:
        from fxprune.calibration import load_refit, run_sequential

        if isinstance(job.result, fx.GraphModule):
            run_sequential(job.sequential_plan, job.result, job.calibration)
        else:  # a Hugging Face model pruned in place runs its own forward: refit on its pruned graph, copy by name
            graph = rewrite(job.dg, job.removal)
            weights = dict(graph.named_parameters(remove_duplicate=False))
            load_refit(graph, {n: p.detach() for n, p in job.result.named_parameters(remove_duplicate=False)
                               if n in weights})  # the one-shot refit and the sliced weights, as the model has them
            done = run_sequential(job.sequential_plan, graph, job.calibration)
            load_refit(job.result, {name: weights[name].detach() for name in done})
        job.refit_report["sequential"] = {name: c.as_dict() for name, c in job.sequential_plan.choices.items()}
        job.sequential_plan = None  # frees the copy of the original graph an in-place pruning keeps


def _reestimate_bn(job: Job) -> None:
    """With ``reestimate_bn=True``: the pruned graph's BatchNorm running statistics from the calibration batches."""
    if job.reestimate_bn:
        from fxprune.calibration import reestimate_batchnorm

        reestimate_batchnorm(job.result, job.calibration, inplace=True)


def _verify(job: Job) -> None:
    if not (job.inplace and is_hf_model(job.model)):
        verify(job.result, job.dg.example_inputs, job.dg.expected_shapes)


def _measure(job: Job) -> None:
    """With a target: count the pruned graph for real; warn when it is more than 2% (relative) off the target."""
    if job.target is None:
        return
    metric, fraction = job.target
    if metric == "latency":  # measured while searching; the search warns when it is off
        job.achieved = {"latency": job.search.measured}
        job.result.meta["fxprune_latency"] = {"target": fraction, "measured": job.search.measured,
                                              "estimated": job.search.estimated, "tries": job.search.tries}
        return
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
    settings = {"ratio": job.ratio, "importance": job.importance, "round_to": job.round_to,
                "alignment": job.alignment, "prune_head_dims": job.prune_head_dims}
    # a replay removes the same units but neither refits nor re-estimates: say so in the plan (and how it ranked)
    for name in ("reconstruct", "sequential", "reestimate_bn", "isomorphic"):
        if getattr(job, name):
            settings[name] = True
    attach_plan(job.result, PruningPlan.from_removal(job.dg, job.removal, inplace=job.inplace, settings=settings))


ANALYSIS = [("capture", _capture), ("propagate", _propagate), ("decompose", _decompose), ("relate", _relate),
            ("solve", _solve)]
PRUNING = [("score", _score), ("plan", _plan), ("check", _check_removed), ("refit", _refit), ("rewrite", _rewrite),
           ("recompose", _recompose), ("reconstruct", _reconstruct), ("sequential", _sequential),
           ("reestimate_bn", _reestimate_bn), ("verify", _verify), ("measure", _measure), ("record", _record_plan)]
PIPELINE = ANALYSIS + PRUNING


def run(job: Job, passes) -> Job:
    for _name, fn in passes:
        fn(job)
    return job


def analyze(model, example_inputs=None, *, kwargs=None, ignore=(), inplace: bool = False,
            prune_head_dims: bool = False) -> DependencyGraph:
    """Capture ``model`` and build its dependency graph (groups, members, frozen reasons).

    Attention's per-head widths are frozen unless ``prune_head_dims=True`` (heads
    and kv heads stay prunable). ``inplace=True`` prepares a later
    ``apply(dg, ..., inplace=True)`` on a Hugging Face model: groups its modules
    cannot express (head dims) are frozen whatever ``prune_head_dims`` says.
    """
    job = Job(model, example_inputs, kwargs, ignore=tuple(ignore), inplace=inplace, prune_head_dims=prune_head_dims)
    return run(job, ANALYSIS).dg


def apply(dg: DependencyGraph, removal: dict, *, inplace: bool = False) -> fx.GraphModule:
    """Remove exactly the given units ``{group (or its id): unit indices}``; verified before returning.

    With ``inplace=True`` on a Hugging Face model (analysed with ``inplace=True``
    so that head dims are kept), the model itself is pruned and returned.
    """
    if inplace and is_hf_model(getattr(dg, "model", None)):
        gm = hf_inplace.prune_in_place(dg, removal, rewrite, verify)
    else:
        gm = _rewritten(dg, removal, inplace)
        verify(gm, dg.example_inputs, dg.expected_shapes)
    attach_plan(gm, PruningPlan.from_removal(dg, removal, inplace=inplace))
    return gm


def _rewritten(dg: DependencyGraph, removal: dict, inplace: bool = False) -> fx.GraphModule:
    """The passes rewrite + recompose in one call, for ``apply`` and for candidates a latency search measures."""
    gm = rewrite(dg, removal, inplace=inplace)
    recompose(gm)
    return gm


def prune(model, ratio: float | None = None, *, example_inputs=None, kwargs=None, importance="l2", ignore=(),
          round_to=None, prune_head_dims: bool = False, inplace: bool = False, global_pruning: bool = False,
          max_ratio: float = 0.9, ratios: dict | None = None, target_macs: float | None = None,
          target_params: float | None = None, target_latency: float | None = None, calibration=None,
          loss_fn=None, reconstruct: bool = False, sequential: bool = False,
          reestimate_bn: bool = False, isomorphic: bool = False) -> fx.GraphModule:
    """Remove ``ratio`` (default 0.3) of the units of every prunable group; returns a verified GraphModule.

    ``model`` is an ``nn.Module`` (traced here) or a ``torch.fx.GraphModule``.
    ``ignore`` lists modules, module names or parameter names whose axes must not
    change. Without ``inplace=True`` the caller's model is left untouched. With
    ``inplace=True`` a Hugging Face model is pruned in place and returned (it
    still generates, saves and reloads; see :mod:`fxprune.huggingface`).

    ``importance``: a name (``"l2"``, ``"l1"``, ``"lamp"``, ``"fpgm"``, ``"bn_scale"``,
    ``"taylor"``, ``"hessian"``, ``"activation"``, ``"wanda"``, ``"obs"``, ``"obs-output"``, ``"random"``), a
    criterion object
    or a callable (see :mod:`fxprune.importance`); ``"taylor"``/``"hessian"`` need ``calibration`` batches
    and ``loss_fn(model, batch)`` (default: cross-entropy of ``(inputs, targets)`` batches);
    ``"activation"``/``"wanda"``/``"obs"`` need ``calibration`` batches of model inputs (a tensor, a tuple of
    positional inputs or a dict of keyword inputs each); ``"obs"`` (structured Optimal Brain Surgeon) scores
    a unit by the output error its consumers keep after refitting without it, the natural partner of
    ``reconstruct=True`` (both read one pass of statistics); ``"obs-output"`` weighs that error by how much the
    model's output moves with it and removes units greedily, so its scores compare across layers: use it with
    ``global_pruning=True, isomorphic=True`` (each kind of group loses the ratio where the output moves least).
    ``reconstruct=True`` refits every Linear, weight
    matmul (``x @ W``, GPT-2's addmm) or convolution that loses input columns (kept columns and bias, ridge
    least squares on the calibration inputs, its strength chosen per layer on held-out calibration tokens;
    what was chosen is in ``result.meta["fxprune_refit"]``) so the pruned model's outputs stay close without
    retraining (:mod:`fxprune.calibration`); it needs ``calibration``; with ``inplace=True`` on a Hugging Face model the
    refit weights are written into the model (which still generates, saves and reloads).
    ``sequential=True`` (with ``reconstruct=True``) refits those layers front to back instead, each on the
    pruned model's own inputs after the layers before it were refit, to reproduce the original model's
    outputs of that layer (one pass over the calibration batches per stage of layers:
    :mod:`fxprune.calibration.sequential`). ``reestimate_bn=True`` resets the pruned model's BatchNorm
    running statistics and re-estimates them on ``calibration`` (after any refit;
    :func:`fxprune.calibration.reestimate_batchnorm`; BatchNorm modules only, not an exported graph's ops). To recover more,
    train the result a short while against the original: ``fxprune.distill(pruned, model, calibration,
    steps=200)`` (:mod:`fxprune.calibration.distill`).
    ``global_pruning=True`` ranks units of all groups together (at most ``max_ratio``
    of one group). ``ratios={"layer4": 0.7, model.fc: 0.0}`` sets ratios per module or group.
    ``target_macs=0.5`` (or ``target_params``) searches the ratio that keeps that fraction.
    With both ``global_pruning=True`` and a target, the budget goes where it hurts least per
    MAC (parameter) saved: units are ranked by normalised score over the MACs (parameters)
    one of them is worth, and scores are normalised per group *type* (heads, MLP units, conv
    channels, residual stream: :mod:`fxprune.planning.costs`), so attention heads and MLP units
    compete on one scale; e.g. ``prune(model, target_macs=0.5, global_pruning=True)`` removes
    more units of a group whose units feed a wide input than of a cheap one of the same scores.
    ``max_ratio``, alignment steps, ``ratios`` and ``ignore`` still hold; on a CNN the costliest
    units are the high-resolution layers', so a lower ``max_ratio`` (0.5) keeps them from being
    emptied first (measured in :mod:`fxprune.planning.costs`). A plain ratio with
    ``global_pruning=True`` removes that fraction of all units by count.
    ``isomorphic=True`` (with ``global_pruning=True``, else ``ValueError``) is isomorphic pruning (Fang et
    al., ECCV 2024): groups of the same structure (same roles, parameter shapes and ops, whatever their
    names or layer: every layer's heads, every same-width MLP) form a class, and every class loses ``ratio``
    of its units, ranked globally within the class only, so heads never pay for MLP units nor a wide layer
    for a narrow one (:mod:`fxprune.planning.isomorphic`). With ``target_macs``/``target_params`` the search
    finds the one ratio every class loses (by count, not by cost: within a class units cost the same);
    ``target_latency`` is not supported with it.
    ``target_latency=0.5`` measures per-layer latency tables on the model's device and
    searches the plan that runs in half the time with the least importance lost, each
    candidate measured against the original (:mod:`fxprune.planning.latency_target`).

    Shapes stay fast by default: every weight dimension that was a multiple of the
    alignment (8 channels: see :mod:`fxprune.planning.alignment`) stays one; ``round_to=k`` sets the alignment
    in channels, ``round_to=1`` turns it off. Attention's per-head widths are kept
    whole (whole heads are removed) unless ``prune_head_dims=True``.

    Example::

        >>> pruned = fxprune.prune(model, example_inputs=(x,), target_macs=0.5, round_to=8)
        >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x,), importance="obs", calibration=batches,
        ...                        reconstruct=True)
    """
    job = Job(model, example_inputs, kwargs, importance=importance, ignore=tuple(ignore), round_to=round_to,
              prune_head_dims=bool(prune_head_dims), inplace=inplace, global_pruning=bool(global_pruning),
              isomorphic=bool(isomorphic), ratios=ratios, calibration=calibration, loss_fn=loss_fn,
              reconstruct=bool(reconstruct),
              sequential=bool(sequential), reestimate_bn=bool(reestimate_bn))
    calibration = job.calibration = check_calibration_settings(calibration, reconstruct, sequential, reestimate_bn)
    job.ratio, job.target, job.max_ratio = check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio,
                                                                target_latency, global_pruning=global_pruning,
                                                                isomorphic=isomorphic)
    if job.target and job.target[0] == "latency" and job.example_inputs is None:
        raise ValueError("target_latency needs example_inputs: latency is measured on real inputs")
    return run(job, PIPELINE).result


def check_calibration_settings(calibration, reconstruct, sequential, reestimate_bn):
    """The calibration batches after checking the options that read them (a list where they are read more
    than once); errors name the option."""
    if sequential and not reconstruct:
        raise ValueError("sequential=True refits the reconstructed layers one stage after another: it needs "
                         "reconstruct=True")
    for name, on in (("reconstruct", reconstruct), ("reestimate_bn", reestimate_bn)):
        if on and calibration is None:
            raise ValueError(f"{name}=True needs calibration batches: pass calibration=[batch, ...] "
                             "(a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs)")
    if (sequential or reestimate_bn) and isinstance(calibration, Iterator):
        calibration = list(calibration)  # read more than once: a generator would be spent
    return calibration


def check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio, target_latency=None, *,
                         global_pruning=False, isomorphic=False) -> tuple:
    """``(ratio, target, max_ratio)`` after checking them; errors name the bad argument."""
    if isomorphic and not global_pruning:
        raise ValueError("isomorphic=True ranks units globally within each class of same-structure groups: it "
                         "needs global_pruning=True (without it every group already loses the same ratio)")
    if isomorphic and target_latency is not None:
        raise ValueError("isomorphic=True takes a ratio, target_macs or target_params, not target_latency (the "
                         "latency search allocates over all groups at once)")
    targets = [(m, v) for m, v in (("macs", target_macs), ("params", target_params), ("latency", target_latency))
               if v is not None]
    if len(targets) > 1:
        raise ValueError(f"give one of target_{targets[0][0]} and target_{targets[1][0]}, not both")
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


def _ignored_keys(gm: fx.GraphModule, state, ignore, model=None) -> list[tuple]:
    """(tensor key, reason) for every parameter or buffer named by ``ignore``.

    Modules are found by identity in the caller's ``model`` (whatever the capture path made of them), names
    among its tensors as well as the graph's; a tensor the graph does not use (export drops them) needs no key.
    """
    names = module_names(gm, model)
    tensors = named_tensors(gm)
    known = list(tensors) + [n for n in named_tensors(model) if n not in tensors] if isinstance(
        model, torch.nn.Module) else list(tensors)
    out = []
    for item in ignore:
        prefix = name_of_key(item, names, "ignore", "ignore takes modules, module names or parameter names, got ")
        found = [n for n in known if n == prefix or n.startswith(prefix + ".") or prefix == ""]
        if not found:
            raise ValueError(f"ignore: no parameter or buffer named {prefix!r} (or inside a module of that name)")
        out.extend((state.param_key(n), f"ignored by the caller ({item if isinstance(item, str) else prefix})")
                   for n in found if n in tensors)
    return out
