"""The pipeline: one flat list of named passes over a :class:`Job`.

::

    capture -> propagate -> decompose -> relate -> solve     (ANALYSIS: fxprune.analyze)
            -> score -> plan -> check -> [refit] -> rewrite -> recompose -> [reconstruct] -> [sequential]
            -> [reestimate_bn] -> verify -> measure -> record     (PRUNING: fxprune.prune runs PIPELINE, both)
            -> depth_plan -> depth_rewrite -> [depth_reconstruct] -> depth_verify     (DEPTH, after ANALYSIS)

With ``depth=``/``layers=``, ``fxprune.prune`` runs ANALYSIS + DEPTH first (residual branches or whole layers
scored and removed: :mod:`fxprune.planning.depth`, :mod:`fxprune.rewriting.depth`, in place
:mod:`fxprune.huggingface.layers`), then, when a width ratio or a target is also asked, PIPELINE on the result.

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

Each pass reads the job's :class:`Settings` (what the caller asked, checked by :mod:`fxprune.api`) and writes
what it makes into the :class:`Job`; analysis results live in ``node.meta`` (``"val"``: FakeTensor;
``"fxprune_rule"``: the rule that related the node) and in the
:class:`~fxprune.analysis.depgraph.DependencyGraph`. A caller may run a subset of the passes, or replace one
(``fxprune.Pruner`` brings its own ``plan``, ``fxprune.mask`` runs ``score`` and ``plan`` only).

Example::

    >>> job = Job(model, (x,), settings=Settings(ratio=0.5))
    >>> run(job, PIPELINE).result            # what fxprune.prune(model, 0.5, example_inputs=(x,)) returns
    >>> run(Job(model, (x,)), ANALYSIS).dg   # what fxprune.analyze(model, (x,)) returns
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune.analysis import dynamic
from fxprune.analysis.capture import (EXPORTED, capture, flat_inputs, inline_mode_regions, is_hf_model,
                                      keep_user_attributes, module_names, name_of_key, split_inputs)
from fxprune.analysis.decompose import decompose
from fxprune.analysis.depgraph import DependencyGraph
from fxprune.analysis.macs import count_graph, estimate
from fxprune.analysis.propagate import propagate, propagate_new, reuse_export_values
from fxprune.analysis.relate import relate
from fxprune.analysis.shapes import GraphShapes, PlannedShapes
from fxprune.analysis.untie import untie_constants
from fxprune.calibration import (collect_statistics, load_refit, plan_sequential, reestimate_batchnorm,
                                 refit_consumers, run_sequential)
from fxprune.calibration.output_check import check_refits, original_outputs
from fxprune.calibration.reconstruct import attach_refit_report, refit_groups
from fxprune.calibration.statistics import held_out_calibration
from fxprune.calibration.depth_refit import refit_after_depth
from fxprune.calibration.depth_scores import OutputError, block_influence
from fxprune.huggingface.freezes import freeze_head_dims, internal_outputs
from fxprune.huggingface import portable as portable_plans
from fxprune.huggingface.config_fields import field_name
from fxprune.huggingface.inplace import FittedConfig, HuggingFace
from fxprune.huggingface.layers import HuggingFaceDepth
from fxprune.importance.depth import depth_magnitude
from fxprune.importance import named_tensors, resolve_importance, score_groups
from fxprune.io.plans import PruningPlan, attach_plan
from fxprune.io.serialize import picklable
from fxprune.planning.alignment import default_alignment, removal_steps
from fxprune.planning.costs import group_types
from fxprune.planning.depth import criterion_for, plan_depth
from fxprune.planning.isomorphic import class_ids
from fxprune.planning.latency_target import search_latency
from fxprune.planning.minimum import keep_minimum
from fxprune.planning.ratios import group_ratios
from fxprune.planning.planner import make_plan
from fxprune.planning.ties import honour_ties
from fxprune.planning.selection import units_to_keep
from fxprune.planning.target import METRICS, search_by_cost, search_ratio
from fxprune.rewriting.depth import remove_depth
from fxprune.rewriting.inplace import Snapshot, prune_in_place
from fxprune.rewriting.inplace.depth import remove_in_place, renamed_parameters
from fxprune.rewriting.inplace.freezes import freeze_computed_constants, freeze_module
from fxprune.rewriting.inplace.mechanism import InPlaceError
from fxprune.rewriting.recompose import recompose
from fxprune.rewriting.rewrite import rewrite
from fxprune.rewriting.verify import output_shapes, verify, verify_other_sizes


@dataclass
class Settings:
    """What the caller asked for, after :mod:`fxprune.api` checked it. The passes read these; only a caller's own
    ``plan`` pass (``fxprune.Pruner``'s) sets ``target``, the target of its step."""

    ratio: float = 0.0
    importance: object = "l2"
    ignore: tuple = ()
    round_to: int | None = None  # channel alignment; None: chosen from the model's device and dtype
    prune_head_dims: bool = False  # prune attention's per-head widths too (off: SDPA keeps its fused kernels)
    inplace: bool = False
    global_pruning: bool = False
    isomorphic: bool = False  # global ranking within each class of isomorphic groups (planning/isomorphic.py)
    max_ratio: float = 0.9
    ratios: dict | None = None  # {module name | module | group | group id: ratio}
    target: tuple | None = None  # ("macs" | "params" | "latency", fraction of the original kept)
    calibration: object = None  # batches for gradient and activation criteria and for reconstruction
    loss_fn: object = None
    reconstruct: bool = False  # refit the consumers of pruned units on calibration statistics
    sequential: bool = False  # refit front to back on the pruned model's inputs (needs reconstruct)
    reestimate_bn: bool = False  # re-estimate BatchNorm running statistics of the pruned model
    depth: object = None  # a fraction of the residual branches, or {kind: fraction} (planning/depth.py)
    layers: int | None = None  # whole layers to remove
    depth_importance: str | None = None  # "block_influence" | "output_error" | "magnitude" (None: by calibration)
    portable: bool = False  # only plans the model's config can state (huggingface/portable.py)
    dynamic_shapes: object = None  # torch.export's dynamic_shapes (None: analysis/dynamic.py decides what varies)


def prunes_hf_in_place(model, inplace: bool) -> bool:
    """Whether pruning writes back into the caller's Hugging Face model (``inplace=True`` on a
    ``PreTrainedModel``) instead of returning a pruned graph: the one place this is decided."""
    return bool(inplace) and is_hf_model(model)


@dataclass
class Job:
    """One run of the pipeline: the model and its inputs, the :class:`Settings`, and what the passes make."""

    model: object
    example_inputs: object = None
    kwargs: dict | None = None
    settings: Settings = field(default_factory=Settings)
    # what the passes make, in pass order
    gm: fx.GraphModule | None = None  # capture
    flat_inputs: tuple | None = None  # capture
    fresh_export: bool = False  # capture exported the model from these very inputs: propagate may keep its shapes
    reused_shapes: bool = False  # propagate kept the export's shapes (static) instead of propagating again
    expected_shapes: list | None = None  # propagate (relate, in place: the internal outputs too)
    state: object = None  # relate
    dg: DependencyGraph | None = None  # solve
    scores: dict = field(default_factory=dict)  # score
    ratio: float = field(init=False)  # plan: settings.ratio, or the ratio a target search found
    alignment: int = 1  # plan: the channel alignment the plan used (resolved from round_to)
    steps: dict = field(default_factory=dict)  # plan: {group: units it loses at a time} that keep widths aligned
    removal: dict = field(default_factory=dict)  # plan: {group: units to remove}
    config_fit: object = None  # plan, portable=True: huggingface.portable.Fit (config values the plan needs)
    search: object = None  # plan: target.SearchResult when a target was searched
    plan_normalizer: object = "mean"  # score: how a global plan puts groups' scores on one scale (the criterion's)
    refit: dict = field(default_factory=dict)  # refit: {parameter name: refit tensor} when reconstructing
    refit_report: dict = field(default_factory=dict)  # refit, sequential: {"one-shot"/"sequential": {weight: choice}}
    sequential_plan: object = None  # refit: calibration.SequentialPlan, read before rewriting
    refit_check: tuple | None = None  # refit: (held-out batches, original outputs, [(weight, names)]) to check
    result: fx.GraphModule | None = None  # rewrite: the pruned graph, or the model itself pruned in place
    achieved: dict = field(default_factory=dict)  # measure: {"macs": fraction kept, "params": ...} with a target
    depth_plan: object = None  # depth_plan: planning.depth.DepthPlan (branches and layers to remove)
    depth_names: dict = field(default_factory=dict)  # depth_rewrite in place: {old parameter name: new or None}
    hf_in_place: bool = field(init=False)  # decided once: prunes_hf_in_place(model, settings.inplace)
    times: dict = field(default_factory=dict)  # run: {pass name: wall seconds} of the passes run so far
    cpu_times: dict = field(default_factory=dict)  # run: {pass name: CPU seconds of this process}

    def __post_init__(self):
        self.ratio = self.settings.ratio
        self.hf_in_place = prunes_hf_in_place(self.model, self.settings.inplace)


def _capture(job: Job) -> None:
    job.example_inputs, job.kwargs = split_inputs(job.example_inputs, job.kwargs)
    # pruned in place, a Hugging Face model keeps its own forward: the graph is analysed, never returned, so
    # static sizes do (half the export time), unless calibration batches of other sizes must run through it
    static = job.hf_in_place and job.settings.calibration is None
    gm = capture(job.model, job.example_inputs, job.kwargs, dynamic=not static,
                 dynamic_shapes=job.settings.dynamic_shapes)
    job.fresh_export = gm is not job.model and gm.meta.get("fxprune_capture") == EXPORTED
    if gm is job.model:  # never edit the caller's graph: a fresh graph over the same modules
        fresh = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
        fresh.meta.update(gm.meta)
        keep_user_attributes(gm, fresh)
        gm = fresh
        inline_mode_regions(gm)  # a graph the caller exported may hold no_grad / autocast regions
    job.gm = picklable(gm)  # torch.save of the result (a copy) would fail on load for an exported graph
    job.flat_inputs = flat_inputs(gm, job.example_inputs, job.kwargs)
    if dynamic.SHAPES_META not in gm.meta and job.flat_inputs is not None:  # traced: symbolic sizes by construction
        dynamic.record_traced(gm, job.flat_inputs, job.settings.dynamic_shapes,
                              "torch.fx.symbolic_trace" if gm is not job.model else "the caller's GraphModule")


def _propagate(job: Job) -> None:
    # a static export already traced these inputs: its shapes are the ones propagation would compute
    job.reused_shapes = job.fresh_export and reuse_export_values(job.gm)
    if not job.reused_shapes:
        propagate(job.gm, job.flat_inputs)
    job.expected_shapes = output_shapes(job.gm)


def _decompose(job: Job) -> None:
    if decompose(job.gm):  # the decomposed calls' new nodes get shapes; the rest keep theirs
        propagate_new(job.gm, job.flat_inputs)


def _relate(job: Job) -> None:
    free = internal_outputs(job.gm) if job.hf_in_place else set()
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
    if shared and not job.settings.inplace and untie_constants(job.gm, shared):
        _relate(job)
        dg = job.dg = _dependency_graph(job)
    dg.expected_shapes = job.expected_shapes
    dg.model, dg.model_inputs, dg.model_kwargs = job.model, job.example_inputs, job.kwargs
    dg.meta["capture"] = job.gm.meta.get(dynamic.SHAPES_META)
    if not job.settings.prune_head_dims:
        dg.keep_head_dims()
    if job.settings.inplace:  # the model's own forward recomputes these: it cannot hold their kept values
        freeze_computed_constants(dg)
    if job.hf_in_place:
        freeze_head_dims(dg, job.model)
    if job.settings.portable:  # after every other freeze: ties among what is still prunable
        portable_plans.prepare(dg, job.model)


def _dependency_graph(job: Job) -> DependencyGraph:
    ignore = _ignored_keys(job.gm, job.state, job.settings.ignore, job.model)
    return DependencyGraph(job.gm, job.state, job.flat_inputs, ignore)


def _score(job: Job) -> None:
    s = job.settings
    if s.reconstruct:  # one pass feeds the refit and an activation criterion on the same batches (cached on dg)
        collect_statistics(job.dg, s.calibration, gram=True)
    criterion = resolve_importance(s.importance, s.calibration, s.loss_fn)
    job.scores = score_groups(criterion, job.dg, job.dg.prunable_groups)
    # a criterion whose scores are on one scale across groups (in units of the model's output) is ranked as it is
    job.plan_normalizer = getattr(criterion, "plan_normalizer", "mean")


def _plan(job: Job) -> None:
    s = job.settings
    groups, fixed = job.dg.prunable_groups, group_ratios(job.dg, s.ratios)
    job.alignment = s.round_to if s.round_to is not None else default_alignment(job.model)
    job.steps = removal_steps(job.dg, groups, job.alignment)

    def plan_for(ratio: float, costs: dict | None = None) -> dict:
        return make_plan(groups, job.scores, ratio, steps=job.steps, global_pruning=s.global_pruning,
                         max_ratio=s.max_ratio, fixed=fixed, costs=costs, types=types, classes=classes,
                         normalizer=job.plan_normalizer, ties=job.dg.count_ties)

    types = None
    # isomorphic: each class of same-structure groups loses the ratio, so a target searches that one ratio
    classes = class_ids(job.dg, groups) if s.isomorphic else None
    if s.target is not None and s.global_pruning and s.target[0] in METRICS and not s.isomorphic:
        # by cost: the units that lose least score per MAC (parameter) saved; the ratio is a fraction of the cost
        ranked = [g for g in groups if g in job.scores and g not in fixed]
        types = group_types(job.dg, ranked)
        job.search = search_by_cost(job.dg, ranked, plan_for, *s.target, steps=job.steps)
        job.removal, job.ratio = job.search.removal, job.search.ratio
    elif s.target is None:
        job.removal = plan_for(job.ratio)
    elif s.target[0] == "latency":
        job.search = search_latency(job.dg, groups, job.scores, job.steps, s.target[1],  # inputs split by capture
                                    lambda removal: rewritten(job.dg, removal), job.model,
                                    tuple(job.example_inputs), job.kwargs,
                                    alignment=job.alignment, max_ratio=s.max_ratio)
        job.removal = job.search.removal
    else:
        job.search = search_ratio(job.dg, plan_for, *s.target)
        job.removal, job.ratio = job.search.removal, job.search.ratio
    if job.dg.count_ties:  # the latency search plans without make_plan; tied plans stay as they are
        job.removal = honour_ties(job.removal, job.dg.count_ties, job.scores, job.steps)
    job.removal = keep_minimum(job.removal, job.scores)  # a router keeps its top-k experts
    if job.settings.portable:  # the config values the plan needs; units given back where it cannot state them
        job.removal, job.config_fit = portable_plans.fit(job.dg, job.removal, job.scores, job.steps)
        job.dg.config_fit = job.config_fit  # read where the config is updated (in place)


def _check_removed(job: Job) -> None:
    """Warn when the plan removes nothing, or less than half of the asked ratio of the parameters because
    groups are frozen for other reasons than graph inputs/outputs, kernel/vocabulary axes and ``ignore``, or
    hold back units to keep their widths aligned."""
    if job.settings.target is not None or job.settings.ratios or job.ratio <= 0:
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
    if job.settings.reconstruct:
        job.refit = refit_consumers(job.dg, job.removal, job.settings.calibration,
                                    report=job.refit_report.setdefault("one-shot", {}))
        held = held_out_calibration(job.dg, job.settings.calibration)  # kept by the statistics pass
        targets = original_outputs(job.dg.gm, held) if job.refit and held else []
        if targets:
            job.refit_check = (held[:len(targets)], targets, refit_groups(job.dg, job.removal, job.refit))
        else:
            job.refit_report["output check"] = (
                "not run: nothing refit" if not job.refit else
                "not run: no calibration batch holds 5 sequences to hold out" if not held else
                "not run: the model has no floating-point output")
        if job.settings.sequential:  # the original graph and weights are the targets: read them before rewriting
            job.sequential_plan = plan_sequential(job.dg, job.removal, inplace=job.settings.inplace)


_REPLANS = 3  # in place: plans made again with the widths of a module whose own forward could not hold them


def _rewrite(job: Job) -> None:
    if not job.settings.inplace:
        job.result = rewrite(job.dg, job.removal)
        return
    for attempt in range(_REPLANS + 1):  # rewritten, recomposed, verified, written into the model and checked
        try:
            if not job.settings.portable:
                job.result = in_place(job.dg, job.removal)
                return
            if _portable_in_place(job, last=attempt == _REPLANS):
                return
        except InPlaceError as exc:
            if attempt == _REPLANS or not _keep_failing_module(job, exc):
                raise
        _plan(job)  # the same ratio or target over the groups still prunable
        _check_removed(job)
        _refit(job)


def _keep_failing_module(job: Job, exc) -> bool:
    """After an in-place failure inside the model's own code: the widths of the innermost submodule on the failing
    traceback that has prunable ones stay whole (with a warning that says why), so that the plan can be made
    again. False when there is none, or the failure is in the model's own top-level forward (a width it
    hard-codes there): the error stands."""
    line = str(exc).split("it failed at ", 1)[-1].split(" <- ")[0] if "it failed at " in str(exc) else ""
    for path in exc.modules:
        if not path:  # the model's own top-level forward: keeping all its widths is no plan
            return False
        reason = (f"kept whole in place: {path}'s own forward cannot hold its pruned widths "
                  f"({line or 'its forward fails'}); inplace=False prunes it")
        frozen = freeze_module(job.dg, path, reason)
        if frozen:
            warnings.warn(f"fxprune: {type(job.model).__name__} pruned in place: {len(frozen)} groups with tensors "
                          f"in {path or 'the model'} keep all their units, because its own forward cannot hold "
                          f"their pruned widths ({line or str(exc)[:200]}); the rest is planned again. "
                          f"inplace=False returns a graph that prunes them too", stacklevel=5)
            return True
    return False


def _portable_in_place(job: Job, last: bool) -> bool:
    """In place with ``portable=True``; False (the model put back as it was, plan again) where the updated config
    still cannot state the pruned model: records a rebuild would get wrong that no shape showed before pruning
    (T5's ``model_dim``, a scale of its tied output). The groups responsible keep their units, with the reason.
    Only the warnings of the try that stays are shown."""
    saved = Snapshot(job.model, getattr(job.model, "config", None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job.result = in_place(job.dg, job.removal)
    culprits = {} if last or not is_hf_model(job.model) else portable_plans.unstated(job.dg, job.model)
    if not culprits:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return True
    saved.restore()
    for group, reason in culprits.items():
        group.frozen.append(reason)
    job.dg.count_ties = [t for t in job.dg.count_ties if all(g.prunable for g in t.members)]
    warnings.warn(f"fxprune portable=True: {len(culprits)} groups kept whole after all, the plan made again: "
                  f"{next(iter(culprits.values()))}", stacklevel=5)
    return False


def in_place(dg: DependencyGraph, removal: dict, run: bool = True):
    """The caller's model pruned in place (:mod:`fxprune.rewriting.inplace`), with the Hugging Face layer on top
    for a transformers model (:mod:`fxprune.huggingface.inplace`), or the fitted config of a ``portable=True`` plan
    for a diffusers model (:class:`~fxprune.huggingface.inplace.FittedConfig`); returns the model."""
    if is_hf_model(dg.model):
        extension = HuggingFace(dg, removal)
    elif getattr(dg, "config_fit", None) is not None:
        extension = FittedConfig(dg)
    else:
        extension = None
    return prune_in_place(dg, removal, extension, run=run)


def _recompose(job: Job) -> None:
    """Decomposed ``nn.MultiheadAttention`` calls become module calls again (resized), to keep the fused path."""
    if not job.settings.inplace:
        recompose(job.result)


def _reconstruct(job: Job) -> None:
    """Write the refit weights into the pruned graph (rewriting keeps parameter names), or into a Hugging Face
    model pruned in place: its resized tensors were written back under the exported graph's names, which are
    the model's own parameter names (a refit consumer without a bias gets none)."""
    if job.refit and job.refit_check is not None:  # each refit kept only where the model's output gains
        held, targets, groups = job.refit_check
        summary: dict = {}
        job.refit = check_refits(job.result, job.refit, groups, held, targets, job.refit_report["one-shot"], summary)
        undone = [w for w, names in groups if names and not any(n in job.refit for n in names)]
        job.refit_report["output check"] = {"held_out_sequences": sum(t.shape[0] for t, _ in targets),
                                            "consumers": len(groups), "undone": undone, **summary}
    elif job.refit:
        load_refit(job.result, job.refit)
    if job.refit_report:
        attach_refit_report(job.result, job.refit_report)


def _sequential(job: Job) -> None:
    """With ``sequential=True``: refit the consumers stage by stage on the pruned graph's own inputs (a consumer
    whose call is not a node of the pruned graph, such as a recomposed attention's, keeps the one-shot refit)."""
    if job.sequential_plan is not None:
        if isinstance(job.result, fx.GraphModule):
            run_sequential(job.sequential_plan, job.result, job.settings.calibration)
        else:  # a Hugging Face model pruned in place runs its own forward: refit on its pruned graph, copy by name
            graph = rewrite(job.dg, job.removal)
            weights = dict(graph.named_parameters(remove_duplicate=False))
            load_refit(graph, {n: p.detach() for n, p in job.result.named_parameters(remove_duplicate=False)
                               if n in weights})  # the one-shot refit and the sliced weights, as the model has them
            done = run_sequential(job.sequential_plan, graph, job.settings.calibration)
            load_refit(job.result, {name: weights[name].detach() for name in done})
        job.refit_report["sequential"] = {name: c.as_dict() for name, c in job.sequential_plan.choices.items()}
        job.sequential_plan = None  # frees the copy of the original graph an in-place pruning keeps


def _reestimate_bn(job: Job) -> None:
    """With ``reestimate_bn=True``: the pruned graph's BatchNorm running statistics from the calibration batches."""
    if job.settings.reestimate_bn:
        reestimate_batchnorm(job.result, job.settings.calibration, inplace=True)


def _verify(job: Job) -> None:
    if not job.settings.inplace:  # in place: checked against the caller's own forward (two batch sizes) in rewrite
        # other sizes first: verify leaves the example's shapes in the graph
        verify_other_sizes(job.result, job.dg.example_inputs, type(job.model).__name__)
        verify(job.result, job.dg.example_inputs, job.dg.expected_shapes)


def _measure(job: Job) -> None:
    """With a target: count the pruned graph for real; warn when it is more than 2% (relative) off the target."""
    if job.settings.target is None:
        return
    metric, fraction = job.settings.target
    if metric == "latency":  # measured while searching; the search warns when it is off
        job.achieved = {"latency": job.search.measured}
        value = {"target": fraction, "measured": job.search.measured, "estimated": job.search.estimated,
                 "tries": job.search.tries}
        if isinstance(getattr(job.result, "meta", None), dict):
            job.result.meta["fxprune_latency"] = value
        else:  # a model pruned in place: an attribute, as its plan (io.plans.attach_plan)
            object.__setattr__(job.result, "fxprune_latency", value)
        return
    before = count_graph(job.dg.gm)
    outputs = job.result.graph.find_nodes(op="output") if isinstance(job.result, fx.GraphModule) else []
    if outputs and all("val" in n.meta for n in outputs):
        after = count_graph(job.result)
    else:  # pruned in place: the plan's count is exact
        after = estimate(job.dg, job.removal)
    job.achieved = {m: after[i] / before[i] if before[i] else 1.0 for i, m in enumerate(METRICS)}
    if abs(job.achieved[metric] - fraction) > 0.02 * fraction:
        warnings.warn(f"fxprune: target_{metric}={fraction} reached {job.achieved[metric]:.3f} of the original "
                      f"{metric} (groups too coarse, or too much of the model frozen)", stacklevel=3)


def _record_plan(job: Job) -> None:
    """Keep the removal plan on the result (``gm.meta["fxprune_plan"]``) so that it can be saved and replayed."""
    settings = {"ratio": job.ratio, "importance": job.settings.importance, "round_to": job.settings.round_to,
                "alignment": job.alignment, "prune_head_dims": job.settings.prune_head_dims}
    # a replay removes the same units but neither refits nor re-estimates: say so in the plan (and how it ranked)
    for name in ("reconstruct", "sequential", "reestimate_bn", "isomorphic", "portable"):
        if getattr(job.settings, name):
            settings[name] = True
    if job.config_fit is not None:  # the config values a model built for this plan needs
        settings["config"] = {field_name(f): v for f, v in job.config_fit.values.items()}
    attach_plan(job.result, PruningPlan.from_removal(job.dg, job.removal, inplace=job.settings.inplace,
                                                    settings=settings))


def depth_plan(dg: DependencyGraph, depth=None, layers=None, criterion: str | None = None, calibration=None):
    """The :class:`~fxprune.planning.depth.DepthPlan` of ``depth``/``layers`` on ``dg``, scored by ``criterion``
    (``"block_influence"``, ``"output_error"``, ``"magnitude"``; default by ``calibration``)."""
    criterion = criterion_for(criterion, calibration)
    if criterion == "output_error":
        return plan_depth(dg, depth, layers, criterion, error=OutputError(dg, calibration))
    if criterion == "block_influence":
        return plan_depth(dg, depth, layers, criterion, score=lambda c: block_influence(dg, c, calibration))
    return plan_depth(dg, depth, layers, criterion, score=lambda c: depth_magnitude(dg, c))


def _depth_plan(job: Job) -> None:
    """The residual branches or whole layers to remove (``depth``/``layers``), scored by ``depth_importance``."""
    s = job.settings
    job.depth_plan = depth_plan(job.dg, s.depth, s.layers, s.depth_importance, s.calibration)


def _depth_rewrite(job: Job) -> None:
    """The add of each removed branch becomes its stream, a removed layer's output the stream entering it; in
    place, layers leave their lists and removed branches become ``ZeroBranch`` modules
    (:mod:`fxprune.rewriting.inplace.depth`, with the Hugging Face layer for a transformers model)."""
    plan = job.depth_plan
    if job.settings.inplace:
        job.depth_names = renamed_parameters(job.dg, plan.layers)  # before the layers leave their lists
        extension = HuggingFaceDepth(job.dg) if job.hf_in_place else None
        job.result = remove_in_place(job.dg, plan.branches, plan.layers, extension) if plan else job.model
    else:
        job.result = remove_depth(job.dg, plan.branches, plan.layers)


def _depth_reconstruct(job: Job) -> None:
    """With ``reconstruct=True``: the layers next to each removed branch refit on the calibration batches
    (:mod:`fxprune.calibration.depth_refit`); in place, on a pruned copy of the graph, copied by (new) name."""
    plan = job.depth_plan
    if not (job.settings.reconstruct and plan):
        return
    if not job.settings.inplace:
        refit_after_depth(job.dg, job.result, plan.removed, job.settings.calibration)
        return
    graph = remove_depth(job.dg, plan.branches, plan.layers)
    refit = refit_after_depth(job.dg, graph, plan.removed, job.settings.calibration)
    names = job.depth_names
    load_refit(job.result, {names.get(n, n): t for n, t in refit.items() if names.get(n, n) is not None})


def _depth_verify(job: Job) -> None:
    # in place: checked against the caller's own forward in depth_rewrite; other sizes first: verify leaves the
    # example's shapes in the graph
    if not job.settings.inplace:
        verify_other_sizes(job.result, job.dg.example_inputs, type(job.model).__name__)
        verify(job.result, job.dg.example_inputs, job.dg.expected_shapes)


ANALYSIS = [("capture", _capture), ("propagate", _propagate), ("decompose", _decompose), ("relate", _relate),
            ("solve", _solve)]
PRUNING = [("score", _score), ("plan", _plan), ("check", _check_removed), ("refit", _refit), ("rewrite", _rewrite),
           ("recompose", _recompose), ("reconstruct", _reconstruct), ("sequential", _sequential),
           ("reestimate_bn", _reestimate_bn), ("verify", _verify), ("measure", _measure), ("record", _record_plan)]
PIPELINE = ANALYSIS + PRUNING
# depth pruning (fxprune.prune(..., depth= | layers=)): after ANALYSIS; width pruning then runs PIPELINE on the result
DEPTH = [("depth_plan", _depth_plan), ("depth_rewrite", _depth_rewrite), ("depth_reconstruct", _depth_reconstruct),
         ("depth_verify", _depth_verify)]


def run(job: Job, passes) -> Job:
    """Run ``passes`` on ``job`` in order; each pass's wall and CPU seconds go to ``job.times`` /
    ``job.cpu_times``, and from there to ``dg.meta["times"]`` / ``dg.meta["cpu_times"]`` and the result's
    ``fxprune_times`` (:func:`attach_times`)."""
    with _older_objects_frozen():
        for name, fn in passes:
            wall, cpu = time.perf_counter(), time.process_time()
            fn(job)
            job.times[name] = job.times.get(name, 0.0) + time.perf_counter() - wall
            job.cpu_times[name] = job.cpu_times.get(name, 0.0) + time.process_time() - cpu
            if job.dg is not None:
                job.dg.meta.update(times=job.times, cpu_times=job.cpu_times)
    if job.result is not None:
        attach_times(job.result, job.times, job.cpu_times)
    return job


@contextlib.contextmanager
def _older_objects_frozen():
    """Python's cycle collector leaves the objects that exist when the passes start (the model, its modules and
    tensors) out of its scans while they run (``gc.freeze``), and takes them back after (``gc.unfreeze``): capture
    and rewriting make many objects, and each full collection walked the whole model again (0.3 of 1.6 CPU
    seconds of pruning bert-base in place). Garbage made during the passes is collected as usual. A process that
    froze objects of its own (``gc.get_freeze_count()``) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def attach_times(result, times: dict, cpu_times: dict) -> None:
    """``{"wall": {pass: s}, "cpu": {pass: s}}`` on what prune returned: ``gm.meta["fxprune_times"]``, else (a
    Hugging Face model pruned in place) its ``fxprune_times`` attribute."""
    value = {"wall": {k: round(v, 4) for k, v in times.items()}, "cpu": {k: round(v, 4) for k, v in cpu_times.items()}}
    meta = getattr(result, "meta", None)
    if isinstance(meta, dict):
        meta["fxprune_times"] = value
    else:
        object.__setattr__(result, "fxprune_times", value)


def rewritten(dg: DependencyGraph, removal: dict) -> fx.GraphModule:
    """The passes rewrite + recompose in one call, for ``apply`` and for candidates a latency search measures."""
    gm = rewrite(dg, removal)
    recompose(gm)
    return gm


def _module_named(model, name: str) -> torch.nn.Module | None:
    """The caller's submodule called ``name``, or None (no module of that name, or no model)."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _ignored_keys(gm: fx.GraphModule, state, ignore, model=None) -> list[tuple]:
    """(tensor key, reason) for every parameter or buffer named by ``ignore``.

    Modules are found by identity in the caller's ``model`` (whatever the capture path made of them), names
    among its tensors as well as the graph's; a tensor the graph does not use (export drops them) needs no key.
    A module without tensors (``nn.Identity``) has nothing to keep: a warning names it. Example: timm's
    ``eva02_tiny_patch14_224`` with ``num_classes=0`` has an ``nn.Identity`` head, so
    ``ignore=[model.get_classifier()]`` warns "module 'head' (Identity) has no parameters or buffers".
    """
    names = module_names(gm, model)
    tensors = named_tensors(gm)
    known = list(tensors) + [n for n in named_tensors(model) if n not in tensors] if isinstance(
        model, torch.nn.Module) else list(tensors)
    out = []
    for item in ignore:
        prefix = name_of_key(item, names, "ignore", "ignore takes modules, module names or parameter names, got ")
        found = [n for n in known if n == prefix or n.startswith(prefix + ".") or prefix == ""]
        module = _module_named(model, prefix) if not found else None
        if module is not None:  # nn.Identity (timm's head with num_classes=0): its axes have nothing to keep
            warnings.warn(f"fxprune: ignore: module {prefix!r} ({type(module).__name__}) has no parameters or "
                          f"buffers, so there is nothing of it to keep: the entry changes nothing", stacklevel=5)
            continue
        if not found:
            raise ValueError(f"ignore: no parameter or buffer named {prefix!r} (or inside a module of that name)")
        out.extend((state.param_key(n), f"ignored by the caller ({item if isinstance(item, str) else prefix})")
                   for n in found if n in tensors)
    return out
