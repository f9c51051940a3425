"""Calibration of a checkpoint one decoder layer at a time: data-aware scores and the sequential refit.

The captured graph of the meta model is cut into segments (:mod:`fxprune.io.checkpoint.blocks`: the head, one per
decoder layer, the tail). A segment's tensors are read from the shards (:class:`Weights`, one tensor at a time,
cast to the graph's dtype), the calibration batches' carried values (hidden states, position embeddings,
masks: every value that crosses the segment's end) are pushed through it, and its tensors are dropped before
the next segment's are read. Peak memory: one segment's weights (twice in the refit: original and pruned), the
carried values of every batch, and the statistics of one segment's consumers.

Scores (:func:`layerwise_scores`, criteria ``activation``, ``wanda``, ``obs``): every consumer's input statistics
are collected by the same code as in memory (:func:`fxprune.calibration.statistics.record_input`) while its
segment runs, turned into its members' parts of the group scores (``unit_scores`` of the criterion) as soon as
the segment of its last call is done, and dropped. A group's score is the sum of its members' parts
(:meth:`ActivationCriterion.combine`), so a group that spans every segment (the residual hidden size: q/k/v,
gate/up of every layer and the LM head consume it) gets the same data-aware score as in memory, from the
statistics of every segment, without holding them at once. Groups without a calibrated consumer get L2
magnitude, as in memory. The statistics are those of the original model, so the plan is the in-memory one.

Refit (:func:`layerwise_refit`): sequential, as SparseGPT's and Wanda's pipelines do and as
``fxprune.prune(..., reconstruct=True, sequential=True)`` does: two streams of carried values go through the
segments, the original model's and the pruned model's (the pruned graph, :func:`fxprune.rewriting.rewrite.rewrite` of
the meta graph, fed with the sliced tensors). In each segment its losing consumers are refit stage by stage
(:func:`fxprune.calibration.sequential.stages_of`, :class:`~fxprune.calibration.sequential.StagePairs`): each
fed with the pruned stream's inputs, after every consumer before it was refit, to reproduce the original
stream's output of that consumer. The pruned segment then runs with its refit weights to make the next
segment's pruned inputs. This is the in-memory ``sequential=True`` refit, consumer for consumer, with each
ridge strength validated on the same held-out tokens; the one-shot refit (every consumer on the original
inputs) is not offered here: it ignores the drift the pruning of earlier layers causes, which the pruned stream
measures at no extra cost. So the refits shrink towards the sliced original weights (with the mean corrected),
where the in-memory sequential refit shrinks towards the one-shot refit it starts from. Padding positions (a
dict batch's 2-d ``attention_mask``) count neither in the scores' statistics nor in the refit.

Example::

    >>> scores = layerwise_scores(dg, segments, weights, batches, Activation(batches))
    >>> refit = layerwise_refit(dg, removal, pruned_gm, weights, batches, sink=save_segment)
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from tqdm.auto import tqdm

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.reconstruct import losing_consumers, warn_short
from fxprune.calibration.sequential import StagePairs, _pruned_calls, stages_of
from fxprune.calibration.statistics import record_input, token_mask
from fxprune.importance import Magnitude, named_tensors
from fxprune.importance.slices import unit_indices
from fxprune.io.checkpoint.blocks import SegmentRunner, segments_of


class Weights:
    """The tensors a segment reads (``{get_attr target: tensor}``), from the checkpoint one tensor at a time.

    ``aliases`` maps a graph tensor the checkpoint lacks to the name it is saved under (a tied LM head);
    ``buffers`` holds the buffers the checkpoint does not save (non-persistent ones: rotary ``inv_freq``), built
    for real by the model's own constructor. Floating tensors are cast to the dtype the graph was captured in
    (statistics are then as precise as the graph's arithmetic; the written weights go back to the
    checkpoint's dtype) and moved to ``device``.
    """

    def __init__(self, checkpoint, aliases: dict, buffers: dict, device="cpu"):
        self.checkpoint, self.aliases, self.buffers, self.device = checkpoint, aliases, buffers, torch.device(device)

    def key(self, name: str) -> str | None:
        """The checkpoint name of graph tensor ``name``, None when the checkpoint does not hold it."""
        if name in self.checkpoint:
            return name
        alias = self.aliases.get(name)
        return alias if alias in self.checkpoint else None

    def read(self, node) -> torch.Tensor:
        """The tensor of one ``get_attr`` node, in its graph dtype, on the device."""
        key = self.key(node.target)
        if key is not None:
            tensor = self.checkpoint.read(key)
        elif node.target in self.buffers:
            tensor = self.buffers[node.target]
        else:
            raise KeyError(f"the checkpoint has no tensor {node.target!r} (get_attr node {node.name}) and the model "
                           "does not build it as a buffer")
        dtype = getattr(node.meta.get("val"), "dtype", None)
        if tensor.is_floating_point() and dtype is not None and dtype.is_floating_point:
            tensor = tensor.to(dtype)
        return tensor.to(self.device)

    def load(self, segment) -> dict:
        return {a.target: self.read(a) for a in segment.attrs}


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, disable=None if progress is None else not progress)


def _watch(calls, fn) -> dict:
    """``{call node: (input node, fn(value))}`` for SegmentRunner."""
    return {node: (x, fn) for node, x in calls}


def layerwise_scores(dg, weights: Weights, batches: list, criterion, device="cpu", progress=None) -> dict:
    """``{group: scores}`` of every prunable group under an activation criterion (``Activation``, ``Wanda``,
    ``OBS``), from the checkpoint one segment at a time; equal to ``score_groups(criterion, dg, groups)`` on the
    loaded model (up to the order of floating-point sums within a kernel)."""
    gm = dg.gm
    segments = segments_of(gm, dg.model)
    consumers = calibrated_consumers(dg)
    experts = [name for name, c in consumers.items() if c.experts]
    if experts:  # their statistics need each call's expert offsets or ids, which this pass does not carry
        warnings.warn(f"fxprune: layer-by-layer statistics leave out mixture-of-experts weights ({experts[0]}"
                      f"{', ...' if len(experts) > 1 else ''}): groups read only by them are scored by L2 magnitude; "
                      f"load the model and use fxprune.prune for per-expert statistics", stacklevel=2)
        consumers = {name: c for name, c in consumers.items() if not c.experts}
    seg_of = {n: s.index for s in segments for n in s.nodes}
    done_in = {name: max(seg_of[n] for n, _ in c.calls) for name, c in consumers.items()}
    meta = named_tensors(gm)  # tied names share one (meta) tensor: a member is found by identity, as in memory
    by_id = {id(meta[name]): name for name in consumers if name in meta}
    groups = dg.prunable_groups
    parts = {g: [None] * len(g.parameters) for g in groups}
    needs: dict[str, list] = {}
    for g in groups:
        for i, member in enumerate(g.parameters):
            name = by_id.get(id(meta.get(member.name)))
            if name is not None and member.dim == consumers[name].in_axis:
                needs.setdefault(name, []).append((g, i, member))
    runner = SegmentRunner(gm, device)
    carry = [runner.inputs(b) for b in batches]
    masks, mask = [token_mask(b) for b in batches], [None]
    stats: dict = {}
    bar = _bar(len(segments) * len(carry), "fxprune layer-by-layer statistics", progress)
    with torch.no_grad(), bar:
        for segment in segments:
            tensors = weights.load(segment)
            watch = {}
            for c in consumers.values():
                watch.update(_watch([(n, x) for n, x in c.calls if seg_of[n] == segment.index],
                                    lambda v, c=c: record_input(stats, c, v, criterion.gram, mask=mask[0])))
            for b, values in enumerate(carry):
                mask[0] = masks[b]  # padding positions of this batch do not count
                carry[b] = runner.run_segment(segment, values, tensors, watch)
                bar.update()
            for name in [n for n, k in done_in.items() if k == segment.index and n in stats]:
                c = consumers[name]
                for g, i, member in needs.get(name, []):
                    parts[g][i] = criterion.unit_scores(c, tensors[name], stats[name], unit_indices(g, member),
                                                        tensors)
                del stats[name]  # this consumer's statistics are folded into its groups' parts
            del tensors
    fallback = [g for g in groups if all(p is None for p in parts[g])]
    magnitude = _magnitude(dg, fallback, weights)
    return {g: criterion.combine(g, parts[g], partial(magnitude.get, g)) for g in groups}


def _magnitude(dg, groups, weights: Weights) -> dict:
    """L2 magnitude scores of groups with no calibrated consumer (the criteria's fallback), one tensor at a time."""
    if not groups:
        return {}
    from fxprune.io.checkpoint.scores import stream_scores

    return stream_scores(dg, groups, Magnitude(2), weights.checkpoint, weights.aliases, progress=False)


def layerwise_refit(dg, removal: dict, pruned_gm, weights: Weights, batches: list, sink, slice_tensor,
                    damping: float | None = None, device="cpu", progress=None) -> list[str]:
    """Refit every consumer that loses input columns under ``removal``, one segment at a time, sequentially on
    the pruned model's own inputs; ``sink(segment, {name: refit tensor})`` receives each segment's refit weights
    and biases (graph names, graph dtype) as soon as the segment is done. ``pruned_gm`` is the rewritten meta
    graph (``rewrite(dg, removal)``); ``slice_tensor(name, tensor)`` cuts an original tensor to its pruned
    shape. ``damping``: None validates each refit's ridge strength on held-out tokens
    (:mod:`fxprune.calibration.ridge`), a number fixes it. Returns the refit names."""
    consumers, rows = {}, {}
    for name, c, _, kept_rows in losing_consumers(dg, removal):
        if c.blocks != 1:
            raise NotImplementedError(f"layer-by-layer reconstruction of the grouped convolution {name} (one Gram "
                                      "matrix per block) is not supported: load the model and use fxprune.prune")
        if c.experts:
            raise NotImplementedError(f"layer-by-layer reconstruction of the mixture-of-experts weight {name} (one "
                                      "Gram matrix per expert) is not supported: load the model and use fxprune.prune")
        consumers[name], rows[name] = c, kept_rows
    segments, pruned_segments = segments_of(dg.gm, dg.model), segments_of(pruned_gm, dg.model)
    if [s.name for s in segments] != [s.name for s in pruned_segments]:
        raise ValueError("the pruned graph cuts into other blocks than the original (a bug in fxprune)")
    calls = _pruned_calls(pruned_gm, consumers)
    missing = [n for n in consumers if n not in calls]
    if missing:
        raise ValueError(f"layer-by-layer reconstruction: no call of {missing[0]} in the pruned graph")
    seg_of = {n: s.index for s in segments for n in s.nodes}
    where = {}
    for name, c in consumers.items():
        found = {seg_of[n] for n, _ in c.calls}
        if len(found) != 1:
            raise NotImplementedError(f"layer-by-layer reconstruction: {name} is called in {len(found)} blocks "
                                      "(a weight shared across layers cannot be refit one layer at a time)")
        where[name] = found.pop()
    stages = stages_of(dg.gm, consumers)
    run_o, run_p = SegmentRunner(dg.gm, device), SegmentRunner(pruned_gm, device)
    carry_o = [run_o.inputs(b) for b in batches]
    carry_p = [run_p.inputs(b) for b in batches]
    masks = [token_mask(b) for b in batches]  # padding positions do not count
    done, choices = [], {}
    bar = _bar(len(segments), "fxprune layer-by-layer reconstruction", progress)
    with torch.no_grad(), bar:
        for segment, pruned_segment in zip(segments, pruned_segments):
            original = weights.load(segment)
            pruned = _pruned_tensors(pruned_segment, original, weights, slice_tensor)
            refit = []
            for stage in stages:
                stage = [n for n in stage if where[n] == segment.index]
                if stage:
                    refit += _refit_stage(stage, consumers, calls, rows, segment, pruned_segment, run_o, run_p,
                                          carry_o, carry_p, masks, original, pruned, damping, choices)
            carry_o = [run_o.run_segment(segment, v, original) for v in carry_o]
            carry_p = [run_p.run_segment(pruned_segment, v, pruned) for v in carry_p]
            sink(segment, {name: pruned[name] for name in refit})
            done += refit
            del original, pruned
            bar.update()
    warn_short([(name, c) for name, c in choices.items() if c.tokens < c.width], "layer-by-layer reconstruction")
    return done


def _pruned_tensors(segment, original: dict, weights: Weights, slice_tensor) -> dict:
    """The pruned segment's tensors: the original ones sliced, never sharing memory with them (the refit writes
    into these)."""
    out = {}
    for a in segment.attrs:
        source = original[a.target] if a.target in original else weights.read(a)
        cut = slice_tensor(a.target, source)
        out[a.target] = cut.clone() if cut is source or cut.untyped_storage().data_ptr() == \
            source.untyped_storage().data_ptr() else cut
    return out


def _refit_stage(stage, consumers, calls, rows, segment, pruned_segment, run_o, run_p, carry_o, carry_p, masks,
                 original, pruned, damping, choices: dict) -> list[str]:
    """One stage of one segment: every batch through both segments up to the stage's last call, then the refit
    (written into ``pruned``)."""
    pairs = StagePairs(stage, consumers)
    watch_o, watch_p = {}, {}
    for name in stage:
        c = consumers[name]
        watch_o.update(_watch(c.calls, lambda v, name=name: pairs.original(name, v)))
        for node, x, pc in calls[name]:
            watch_p[node] = (x, lambda v, name=name, pc=pc: pairs.pruned(name, v, pc))
    for values_o, values_p, mask in zip(carry_o, carry_p, masks):
        pairs.begin(mask)
        run_o.run_segment(segment, values_o, original, watch_o, stop=True)
        run_p.run_segment(pruned_segment, values_p, pruned, watch_p, stop=True)
    done = pairs.refit(original, pruned, rows, damping)
    choices.update(pairs.choices)
    return done
