"""The public entry points: ``analyze``, ``apply``, ``prune``, and the checks of their arguments.

Each builds a :class:`~fxprune.pipeline.Job` from its arguments (checked here: errors name the bad argument) and
runs passes of :mod:`fxprune.pipeline` over it: ``analyze`` the analysis passes, ``prune`` all of them;
``apply`` rewrites, verifies and records a removal the caller chose. ``fxprune.mask``, ``fxprune.Pruner`` and
``fxprune.prune_checkpoint`` reuse the checks and run their own selection of passes.

Example::

    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5,
    ...                        example_inputs=(torch.randn(1, 3, 224, 224),))
    >>> dg = fxprune.analyze(model, (x,))
    >>> pruned = fxprune.apply(dg, {dg.prunable_groups[0]: [0, 1]})
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch.fx as fx

from fxprune.analysis.depgraph import DependencyGraph
from fxprune.huggingface.portable import fit_removal
from fxprune.io.plans import PruningPlan, attach_plan
from fxprune.analysis.macs import count_graph
from fxprune.calibration import reestimate_batchnorm
from fxprune.pipeline import ANALYSIS, DEPTH, PIPELINE, Job, Settings, in_place, rewritten, run
from fxprune.calibration.output_check import original_outputs, output_error
from fxprune.calibration.statistics import HELD_SEQUENCES, held_out_batches
from fxprune.importance import resolve_importance
from fxprune.io.plans import find_group, plan_of
from fxprune.planning.depth import check_depth, criterion_for
from fxprune.planning.measured import CachedScores, measured_allocation
from fxprune.planning.latency import ratio_of
from fxprune.planning.target import METRICS
from fxprune.rewriting.depth import DEPTH_META, remove_depth
from fxprune.planning.ratios import check_ratio
from fxprune.rewriting.verify import verify, verify_other_sizes


def analyze(model, example_inputs=None, *, kwargs=None, ignore=(), inplace: bool = False,
            prune_head_dims: bool = False, portable: bool = False, dynamic_shapes=None) -> DependencyGraph:
    """Capture ``model`` and build its dependency graph (groups, members, frozen reasons).

    Attention's per-head widths are frozen unless ``prune_head_dims=True`` (heads
    and kv heads stay prunable). ``inplace=True`` prepares a later
    ``apply(dg, ..., inplace=True)``: axes the model's own forward recomputes are frozen, and on a Hugging Face
    model the groups its modules cannot express (head dims) whatever ``prune_head_dims`` says.
    ``portable=True`` keeps only what the model's config can state (see ``prune``): groups it cannot are frozen
    with a reason starting ``"portable: "``, and ``dg.count_ties`` lists the groups that must lose units
    together; ``apply`` refuses a removal that breaks them.

    The graph takes other batch sizes and (for token inputs) sequence lengths than the example's, also from
    an example of batch 1; an image's height and width stay the example's unless ``dynamic_shapes``
    (``torch.export``'s format, passed to export) asks for them (:mod:`fxprune.analysis.dynamic`).
    ``dg.meta["times"]`` / ``dg.meta["cpu_times"]`` hold each pass's wall / CPU seconds (capture, propagate,
    decompose, relate, solve), ``dg.meta["capture"]`` how the graph was captured and which input sizes it takes.

    Example::

        >>> dg = fxprune.analyze(bert, (torch.randint(0, 100, (1, 16)),))
        >>> dg.meta["capture"]["shapes"], sorted(dg.meta["times"])
        ('dynamic', ['capture', 'decompose', 'propagate', 'relate', 'solve'])
    """
    settings = Settings(ignore=tuple(ignore), inplace=inplace, prune_head_dims=prune_head_dims,
                        portable=bool(portable), dynamic_shapes=dynamic_shapes)
    return run(Job(model, example_inputs, kwargs, settings), ANALYSIS).dg


def apply(dg: DependencyGraph, removal: dict, *, inplace: bool = False) -> fx.GraphModule:
    """Remove exactly the given units ``{group (or its id): unit indices}``; verified before returning.

    With ``inplace=True`` (``dg`` analysed with ``inplace=True``) the model itself is pruned, checked against
    the pruned graph and returned (:mod:`fxprune.rewriting.inplace`).
    """
    if getattr(dg, "portable", None) is not None:  # the config values the removal needs (read when in place)
        dg.config_fit = fit_removal(dg, removal)
    if inplace:
        gm = in_place(dg, removal)
    else:
        gm = rewritten(dg, removal)
        verify_other_sizes(gm, dg.example_inputs, type(getattr(dg, "model", None) or gm).__name__)
        verify(gm, dg.example_inputs, dg.expected_shapes)
    attach_plan(gm, PruningPlan.from_removal(dg, removal, inplace=inplace))
    return gm


def prune(model, ratio: float | None = None, *, example_inputs=None, kwargs=None, importance="l2", ignore=(),
          round_to=None, prune_head_dims: bool = False, inplace: bool = False, global_pruning: bool = False,
          max_ratio: float = 0.9, ratios: dict | None = None, target_macs: float | None = None,
          target_params: float | None = None, target_latency: float | None = None, calibration=None,
          loss_fn=None, reconstruct: bool = False, sequential: bool = False,
          reestimate_bn: bool = False, isomorphic: bool = False, depth=None, layers: int | None = None,
          depth_importance: str | None = None, portable: bool = False,
          dynamic_shapes=None, allocation: str = "one-step", allocation_rounds: int = 0) -> fx.GraphModule:
    """Remove ``ratio`` (default 0.3) of the units of every prunable group; returns a verified GraphModule.

    ``model`` is an ``nn.Module`` (traced here) or a ``torch.fx.GraphModule``.
    ``ignore`` lists modules, module names or parameter names whose axes must not
    change. Without ``inplace=True`` the caller's model is left untouched. With
    ``inplace=True`` the caller's own model is pruned, its own forward checked against the pruned graph at two
    batch sizes, and returned (``prune(model, ..., inplace=True) is model``; any ``nn.Module``:
    :mod:`fxprune.rewriting.inplace`); if that check fails, the model is put back exactly and an error names
    what still holds an old width. A Hugging Face model still generates, saves and reloads
    (:mod:`fxprune.huggingface`).

    ``importance``: a name (``"l2"``, ``"l1"``, ``"lamp"``, ``"fpgm"``, ``"bn_scale"``, ``"taylor"``, ``"hessian"``,
    ``"activation"``, ``"wanda"``, ``"obs"``, ``"obs-output"``, ``"random"``), a criterion object or a callable (see
    :mod:`fxprune.importance`); ``"taylor"``/``"hessian"`` need ``calibration`` batches and ``loss_fn(model,
    batch)`` (default: cross-entropy of ``(inputs, targets)`` batches); ``"activation"``/``"wanda"``/``"obs"`` need
    ``calibration`` batches of model inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs
    each); ``"obs"`` (structured Optimal Brain Surgeon) scores a unit by the output error its consumers keep after
    refitting without it, the natural partner of ``reconstruct=True`` (both read one pass of statistics);
    ``"obs-output"`` weighs that error by how much the model's output moves with it and removes units greedily, so
    its scores compare across layers: use it with ``global_pruning=True, isomorphic=True`` (each kind of group loses
    the ratio where the output moves least). ``reconstruct=True`` refits every Linear, weight matmul (``x @ W``,
    GPT-2's addmm) or convolution that loses input columns (kept columns and bias, ridge least squares on the
    calibration inputs, its strength chosen per layer on held-out calibration tokens, and each layer's refit kept
    only if it brings the model's output closer to the original's on the held-out calibration sequences,
    :mod:`fxprune.calibration.output_check`; what was chosen is in ``result.meta["fxprune_refit"]``) so the pruned
    model's outputs stay close without retraining
    (:mod:`fxprune.calibration`); it needs ``calibration``; with ``inplace=True`` on a Hugging Face model the refit
    weights are written into the model (which still generates, saves and reloads). ``sequential=True`` (with
    ``reconstruct=True``) refits those layers front to back instead, each on the pruned model's own inputs after the
    layers before it were refit, to reproduce the original model's outputs of that layer (one pass over the
    calibration batches per stage of layers: :mod:`fxprune.calibration.sequential`). ``reestimate_bn=True`` resets
    the pruned model's BatchNorm running statistics and re-estimates them on ``calibration`` (after any refit;
    :func:`fxprune.calibration.reestimate_batchnorm`; BatchNorm modules only, not an exported graph's ops). To
    recover more, train the result a short while against the original: ``fxprune.distill(pruned, model, calibration,
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
    ``allocation="measured"`` (with ``isomorphic=True``, ``reconstruct=True`` and ``calibration``) keeps each
    class's count of the isomorphic pruning but spreads it across layers by *measured* output error: probe prunes
    remove 1/6 to 2/3 of every group, each group is put alone into the original and its error on the held-out
    calibration sequences of the output check measured, and each class is split where the summed errors are
    least; ``allocation_rounds=3`` adds up to 3 rounds of swaps measured in context. It costs about 5 prunes
    (MiniLM at 30%: everyday cosine 0.946 against 0.941). If its held-out error is not below the one-step
    allocation's, the one-step pruning is returned with a warning; what it did (counts per class, both errors,
    the rounds, CPU seconds) is in ``result.meta["fxprune_allocation"]`` (:mod:`fxprune.planning.measured`).
    ``portable=True`` (a model with a config it is built from: transformers, diffusers) plans only widths that
    config can state, so that the library's own ``from_pretrained`` reloads the model saved after in-place
    pruning: the same width in every layer (every layer's MLP group loses the same units count, and so on),
    head widths as the class derives them (BERT and GPT-2 derive the head size from hidden / heads, so heads go
    only together with hidden units, 16 per head for GPT-2's 64 / 4), values the class accepts (LLaMA validates
    hidden % heads even with an explicit head_dim); groups it cannot hold are frozen with a ``"portable: ..."``
    reason in ``dg.report()``, and units given back to fit the class are named in a warning
    (:mod:`fxprune.huggingface.portable`). Without it, widths the config cannot state are recorded in
    ``config.fxprune_shapes`` for :func:`fxprune.load_pretrained` (with a warning).
    ``dynamic_shapes`` (``torch.export``'s format) sets which input dimensions the pruned graph takes at other
    sizes than the example's; by default the batch and a token input's sequence (also from an example of batch 1
    or length 1), not an image's height and width (:mod:`fxprune.analysis.dynamic`). A dimension meant to vary
    that the graph fixes anyway gives one warning naming it, is listed in
    ``pruned.meta["fxprune_input_shapes"]``, and another size fails at the graph's entry with a message saying
    which size it was captured for.
    ``pruned.meta["fxprune_times"]`` holds each pass's wall and CPU seconds.
    ``target_latency=0.5`` measures per-layer latency tables on the model's device and
    searches the plan that runs in half the time with the least importance lost, each
    candidate measured against the original (:mod:`fxprune.planning.latency_target`).

    Shapes stay fast by default: every weight dimension that was a multiple of the
    alignment (8 channels: see :mod:`fxprune.planning.alignment`) stays one; ``round_to=k`` sets the alignment
    in channels, ``round_to=1`` turns it off. Attention's per-head widths are kept
    whole (whole heads are removed) unless ``prune_head_dims=True``.

    Depth: ``depth=0.25`` removes a quarter of the model's removable residual branches (``y = x + f(x)``
    becomes ``y = x``: a decoder layer's attention or MLP branch, a ResNet bottleneck without downsampling, a
    ViT or ConvNeXt block; found from the graph, :mod:`fxprune.analysis.branches`, listed by ``dg.report()``),
    ``depth={"attention": 0.5, "mlp": 0.1}`` a fraction of each kind, ``layers=k`` k whole layers (elements of
    a list of blocks). They are chosen by ``depth_importance``: ``"block_influence"`` (ShortGPT, the default with
    ``calibration``), ``"output_error"`` (SLEB's greedy search, one forward per candidate) or ``"magnitude"``
    (no data; the default without ``calibration``): :mod:`fxprune.planning.depth`. ``reconstruct=True`` refits
    the layers next to each removed branch (:mod:`fxprune.calibration.depth_refit`). Without ``ratio`` or a
    target only depth is pruned; with them width pruning then runs on the depth-pruned model
    (``prune(model, 0.2, depth=0.2)``), and a target counts from the original model: depth removes its
    share first and width searches the rest (``target_latency`` measures what the depth pruning saved). In place
    (any model: :mod:`fxprune.rewriting.inplace.depth`), layers leave their ``ModuleList`` or ``Sequential``
    (layer indices follow) and a removed branch becomes a ``ZeroBranch`` module; on a Hugging Face model the
    config follows too (:mod:`fxprune.huggingface.layers`: plain ``from_pretrained`` reloads removed layers,
    ``fxprune.load_pretrained`` removed branches).

    Example::

        >>> pruned = fxprune.prune(model, example_inputs=(x,), target_macs=0.5, round_to=8)
        >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x,), importance="obs", calibration=batches,
        ...                        reconstruct=True)
        >>> pruned = fxprune.prune(model, 0.2, depth=0.2, kwargs=batches[0], calibration=batches)
    """
    if check_allocation(allocation, allocation_rounds, calibration=calibration, reconstruct=reconstruct,
                        isomorphic=isomorphic, sequential=sequential, reestimate_bn=reestimate_bn, inplace=inplace,
                        ratios=ratios, portable=portable, depth=depth, layers=layers,
                        targets=(target_macs, target_params, target_latency)):
        return _prune_measured(model, ratio, example_inputs, kwargs, allocation_rounds, dict(
            importance=importance, ignore=tuple(ignore), round_to=round_to, prune_head_dims=prune_head_dims,
            max_ratio=max_ratio, calibration=list(calibration), loss_fn=loss_fn, dynamic_shapes=dynamic_shapes))
    calibration = check_calibration_settings(calibration, reconstruct, sequential, reestimate_bn)
    depth, layers = check_depth(depth, layers)
    if depth is not None or layers is not None:
        criterion_for(depth_importance, calibration)  # a wrong name or missing batches fail before any analysis
        return _prune_depth(model, ratio, example_inputs, kwargs, dict(
            importance=importance, ignore=tuple(ignore), round_to=round_to, prune_head_dims=bool(prune_head_dims),
            inplace=inplace, global_pruning=bool(global_pruning), isomorphic=bool(isomorphic), ratios=ratios,
            calibration=calibration, loss_fn=loss_fn, reconstruct=bool(reconstruct), sequential=bool(sequential),
            reestimate_bn=bool(reestimate_bn), portable=bool(portable), dynamic_shapes=dynamic_shapes),
            (target_macs, target_params, target_latency), max_ratio,
            depth, layers, depth_importance)
    ratio, target, max_ratio = check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio,
                                                    target_latency, global_pruning=global_pruning,
                                                    isomorphic=isomorphic)
    if target and target[0] == "latency" and example_inputs is None:
        raise ValueError("target_latency needs example_inputs: latency is measured on real inputs")
    settings = Settings(ratio=ratio, importance=importance, ignore=tuple(ignore), round_to=round_to,
                        prune_head_dims=bool(prune_head_dims), inplace=inplace, global_pruning=bool(global_pruning),
                        isomorphic=bool(isomorphic), max_ratio=max_ratio, ratios=ratios, target=target,
                        calibration=calibration, loss_fn=loss_fn, reconstruct=bool(reconstruct),
                        sequential=bool(sequential), reestimate_bn=bool(reestimate_bn), portable=bool(portable),
                        dynamic_shapes=dynamic_shapes)
    job = Job(model, example_inputs, kwargs, settings)
    return run(job, PIPELINE).result


def _prune_depth(model, ratio, example_inputs, kwargs, options: dict, targets: tuple, max_ratio, depth, layers,
                 depth_importance):
    """``prune`` with ``depth``/``layers``: ANALYSIS + DEPTH, then (a ratio or a target asked) PIPELINE on the
    depth-pruned model; a target is the fraction of the original model's metric."""
    target_macs, target_params, target_latency = targets
    width = ratio is not None or any(t is not None for t in targets)
    ratio_, target, max_ratio = check_prune_settings(ratio, target_macs, target_params, options["round_to"],
                                                     max_ratio, target_latency,
                                                     global_pruning=options["global_pruning"],
                                                     isomorphic=options["isomorphic"])
    if target and target[0] == "latency" and example_inputs is None and kwargs is None:
        raise ValueError("target_latency needs example_inputs: latency is measured on real inputs")
    settings = Settings(ignore=options["ignore"], inplace=options["inplace"],
                        prune_head_dims=options["prune_head_dims"],
                        calibration=options["calibration"], reconstruct=options["reconstruct"], depth=depth,
                        layers=layers, depth_importance=depth_importance, dynamic_shapes=options["dynamic_shapes"])
    job = run(Job(model, example_inputs, kwargs, settings), ANALYSIS + DEPTH)
    result = job.result
    if not width:  # depth only: what width's passes would have done after the refit
        if options["sequential"]:
            warnings.warn("fxprune: sequential=True refits the consumers of width pruning; with depth alone the "
                          "refit after depth (reconstruct=True) already runs site by site in graph order",
                          stacklevel=3)
        if options["reestimate_bn"]:
            reestimate_batchnorm(result, options["calibration"], inplace=True)
        return result
    if target is not None:
        target = _remaining_target(job, target)
        if target is None:
            return result
    width_settings = Settings(ratio=ratio_, max_ratio=max_ratio, target=target, **options)
    pruned = run(Job(result, job.example_inputs, job.kwargs, width_settings), PIPELINE).result
    if isinstance(pruned, fx.GraphModule) and isinstance(result, fx.GraphModule):
        pruned.meta[DEPTH_META] = result.meta.get(DEPTH_META)
    return pruned


def _remaining_target(job, target: tuple):
    """The width target on the depth-pruned model that makes ``target`` of the original: its metric divided by
    what depth kept (MACs and parameters counted on the graph, latency measured against the original graph);
    None, with a warning, when depth alone already reached it."""
    metric, fraction = target
    plan = job.depth_plan
    if metric == "latency":
        graph = remove_depth(job.dg, plan.branches, plan.layers, share_tensors=True)
        kept = ratio_of(graph, job.dg.gm, job.dg.example_inputs) if plan else 1.0
    else:
        before = count_graph(job.dg.gm)[METRICS.index(metric)]
        removed = sum(getattr(item, metric) for item in plan.removed)
        kept = (before - removed) / before if before else 1.0
    if fraction >= kept:
        warnings.warn(f"fxprune: depth pruning alone kept {kept:.3f} of the {metric}, at or below "
                      f"target_{metric}={fraction}: no width pruning (ask for less depth to let width share the "
                      f"budget)", stacklevel=4)
        return None
    return metric, fraction / kept


def check_allocation(allocation, rounds, **options) -> bool:
    """True for ``allocation="measured"`` after checking what it needs and what it cannot combine with (errors
    name the option); False for the one-step allocation."""
    if allocation not in ("one-step", "measured"):
        raise ValueError(f'allocation is "one-step" or "measured", got {allocation!r}')
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"allocation_rounds must be a non-negative int, got {rounds!r}")
    if allocation == "one-step":
        if rounds:
            raise ValueError('allocation_rounds swaps units of a measured allocation: it needs allocation="measured"')
        return False
    needs = [(name, why) for name, why in (
        ("calibration", "calibration=[batch, ...]: its held-out sequences measure each group's output error"),
        ("reconstruct", "reconstruct=True: the output check that measures the error runs with the refit"),
        ("isomorphic", "isomorphic=True (and global_pruning=True): the measured allocation spreads each "
                       "isomorphic class's count"))
        if (options[name] is None if name == "calibration" else not options[name])]
    if needs:
        raise ValueError('allocation="measured" needs ' + "; ".join(why for _, why in needs))
    cannot = [name for name in ("sequential", "reestimate_bn", "inplace", "ratios", "portable", "depth", "layers")
              if options[name]] + [t for t, v in zip(("target_macs", "target_params", "target_latency"),
                                                     options["targets"]) if v is not None]
    if cannot:
        raise ValueError(f'allocation="measured" cannot be combined with {", ".join(cannot)}: it splices one-shot '
                         "refits of single groups into the original model and sets per-group ratios for one ratio")
    return True


class _Prober:
    """What :func:`fxprune.planning.measured.measured_allocation` asks of a model (its ``Prober``): prunes with the
    caller's options and one cached criterion, plans read back, held-out output errors (the output check's)."""

    def __init__(self, model, example_inputs, kwargs, options: dict):
        self.model, self.example_inputs, self.kwargs = model, example_inputs, kwargs
        self.dg = analyze(model, example_inputs, kwargs=kwargs, ignore=options["ignore"],
                          prune_head_dims=options["prune_head_dims"], dynamic_shapes=options["dynamic_shapes"])
        calibration = options["calibration"]
        criterion = resolve_importance(options["importance"], calibration, options["loss_fn"])
        self.options = {**options, "importance": CachedScores(criterion), "reconstruct": True}
        self.held = held_out_batches(calibration, HELD_SEQUENCES)
        self.targets = original_outputs(model, self.held)

    def prune(self, ratio, **extra):
        return prune(self.model, ratio, example_inputs=self.example_inputs, kwargs=self.kwargs, **self.options,
                     **extra)

    def entries(self, pruned) -> dict:
        return {find_group(self.dg, e.key): e for e in plan_of(pruned).groups}

    def alignment(self, pruned) -> int:
        return plan_of(pruned).settings.get("alignment", 1)

    def error(self, pruned) -> float:
        check = pruned.meta.get("fxprune_refit", {}).get("output check")
        if not isinstance(check, dict):
            raise ValueError(f'allocation="measured" reads the output check\'s held-out error, which did not run '
                             f"here ({check!r}): the calibration batches need held-out sequences")
        return check["output_error"]

    def measure(self, candidate) -> float:
        return output_error(candidate, self.held, self.targets)


def _prune_measured(model, ratio, example_inputs, kwargs, rounds: int, options: dict):
    """``prune(..., allocation="measured")``: :func:`fxprune.planning.measured.measured_allocation`."""
    ratio = check_ratio(0.3 if ratio is None else ratio)
    return measured_allocation(_Prober(model, example_inputs, kwargs, options), ratio, rounds)


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
