"""Calibration scores for depth pruning: how much a residual branch (or a whole layer) changes the model.

Two measures, both on calibration batches run through the analysed graph (``dg.gm``, real weights):

- **block influence** (ShortGPT, Men et al. 2024): ``1 - cos(x, y)`` between the stream entering a branch
  (layer) and the stream leaving it, per token, averaged over the tokens of every batch. A token is one
  position of the stream tensor with its feature axis taken out (the axis whose groups hold the most
  parameters: the hidden size of a transformer, the channels of a CNN, whose tokens are then pixels). Padding
  is left out: a batch given as a dict with an ``attention_mask`` of the stream's leading (batch, sequence)
  shape weights each token by its mask. One pass over the batches scores every candidate.
- **output error with the candidate removed** (SLEB, Song et al. 2024): the model's first output (logits, a
  last hidden state) with some candidates bypassed against the original's, as a relative squared error over
  the (unpadded) tokens of every batch: ``sum |y' - y|^2 / sum |y|^2``. One forward per candidate and batch;
  :func:`fxprune.planning.depth.greedy_removal` removes the candidate of least error, then measures the rest
  again with it removed (SLEB's greedy iteration).

A candidate is a :class:`~fxprune.analysis.branches.Branch` (stream in: its stream operand, out: its add) or a
:class:`~fxprune.analysis.branches.Layer` (its input and output nodes). Higher scores mean more important.

Example::

    >>> dg = fxprune.analyze(model, kwargs=batches[0])
    >>> scores = block_influence(dg, [b for b in dg.branches if b.removable], batches)
    >>> min(scores, key=scores.get).kind        # the branch that changes its stream least
    'attention'
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxprune.calibration.statistics import placeholder_values


def ends(candidate) -> tuple[str, str]:
    """``(stream in, stream out)`` node names of a branch or layer."""
    if hasattr(candidate, "add"):
        return candidate.stream, candidate.add
    return candidate.input, candidate.output


def feature_axis(dg, name: str) -> int:
    """The axis of node ``name``'s tensor whose groups hold the most parameters (hidden size, channels); ties
    go to the last axis."""
    node = next(n for n in dg.gm.graph.nodes if n.name == name)
    ndim = node.meta["val"].ndim
    best, axis = -1, ndim - 1
    for d in range(ndim):
        try:
            count = sum(len(g.parameters) for g in dg.groups_of(name, d))
        except (KeyError, ValueError):
            continue
        if count > best or (count == best and d == ndim - 1):
            best, axis = count, d
    return axis


def _tokens(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` as (tokens, features) with ``axis`` the features, float64."""
    return t.detach().movedim(axis, -1).reshape(-1, t.shape[axis]).double()


def _token_weights(batch, t: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Per-token weights (tokens,) from a batch's ``attention_mask`` when its shape leads the tensor's, else None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or axis < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    shape = [s for d, s in enumerate(t.shape) if d != axis]
    expanded = mask.to(torch.float64).reshape(*mask.shape, *([1] * (len(shape) - 2))).expand(*shape)
    return expanded.reshape(-1).to(t.device)


class _Watch(fx.Interpreter):
    """Runs a graph, keeping the values of ``keep`` nodes to the end of the pass (the interpreter would free
    them after their last use) and calling ``seen(node, value, kept)`` after each node; nodes in ``skip`` are
    not computed (bypassed branches), ``swap`` maps a node to the node whose value it takes (a bypassed add or
    layer output: its stream)."""

    def __init__(self, gm, keep=(), seen=None, skip=(), swap=None):
        super().__init__(gm)
        self.swap = swap or {}
        self.keep = set(keep) | set(self.swap.values())
        self.seen, self.skip = seen, set(skip)
        self.kept: dict = {}

    def run_node(self, n: fx.Node):
        if n in self.swap:
            value = self.kept[self.swap[n]]
        elif n in self.skip:
            return None
        else:
            value = super().run_node(n)
        if n in self.keep:
            self.kept[n] = value
        if self.seen is not None:
            self.seen(n, value, self.kept)
        return value


def _run(gm, batch, **kw) -> object:
    values = placeholder_values(gm, batch)
    with torch.no_grad():
        return _Watch(gm, **kw).run(*values, enable_io_processing=False)


def _restoring_buffers(gm):
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}

    def restore():
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    return restore


def block_influence(dg, candidates, batches) -> dict:
    """``{candidate: mean over tokens of 1 - cos(stream in, stream out)}`` on ``batches`` (one pass)."""
    if batches is None:
        raise ValueError("block influence needs calibration batches: pass calibration=[batch, ...]")
    nodes = {n.name: n for n in dg.gm.graph.nodes}
    pairs = {c: (nodes[ends(c)[0]], nodes[ends(c)[1]]) for c in candidates}
    axes = {c: feature_axis(dg, ends(c)[1]) for c in candidates}
    by_out: dict = {}
    for c, (_, y) in pairs.items():
        by_out.setdefault(y, []).append(c)
    sums = dict.fromkeys(candidates, 0.0)
    weights = dict.fromkeys(candidates, 0.0)
    restore = _restoring_buffers(dg.gm)
    count = 0
    try:
        for batch in batches:
            count += 1

            def seen(node, value, kept, batch=batch):
                for c in by_out.get(node, ()):
                    axis = axes[c]
                    xs, ys = _tokens(kept[pairs[c][0]], axis), _tokens(value, axis)
                    cos = torch.nn.functional.cosine_similarity(xs, ys, dim=-1, eps=1e-12)
                    w = _token_weights(batch, value, axis)
                    w = torch.ones_like(cos) if w is None else w
                    sums[c] += float(((1 - cos) * w).sum())
                    weights[c] += float(w.sum())

            _run(dg.gm, batch, keep={x for x, _ in pairs.values()}, seen=seen)
    finally:
        restore()
    if count == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    return {c: sums[c] / max(weights[c], 1e-300) for c in candidates}


def first_output(value) -> torch.Tensor:
    """The first floating-point tensor of a graph's outputs (logits, last hidden state)."""
    return next(t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point())


class OutputError:
    """The output error of the model with candidates bypassed, against the original's outputs on ``batches``
    (computed once and kept)."""

    def __init__(self, dg, batches):
        if batches is None:
            raise ValueError("the output error needs calibration batches: pass calibration=[batch, ...]")
        self.dg, self.batches = dg, list(batches)
        if not self.batches:
            raise ValueError("calibration data is empty: pass at least one batch")
        restore = _restoring_buffers(dg.gm)
        try:
            self.reference = [first_output(_run(dg.gm, b)).detach() for b in self.batches]
        finally:
            restore()
        self.nodes = {n.name: n for n in dg.gm.graph.nodes}
        self.forwards = 0

    def __call__(self, removed) -> float:
        """Relative squared error of the first output with ``removed`` (branches and layers) bypassed."""
        skip, swap = set(), {}
        for c in removed:
            x, y = ends(c)
            swap[self.nodes[y]] = self.nodes[x]
            skip.update(self.nodes[n] for n in c.nodes if n not in (x, y))
        # a bypassed output may stand for a stream that is itself bypassed: follow the chain
        for y in list(swap):
            x = swap[y]
            while x in swap:
                x = swap[x]
            swap[y] = x
        skip -= set(swap)
        error, norm = 0.0, 0.0
        restore = _restoring_buffers(self.dg.gm)
        try:
            for batch, reference in zip(self.batches, self.reference):
                got = first_output(_run(self.dg.gm, batch, skip=skip, swap=swap))
                self.forwards += 1
                diff = (got.double() - reference.double()).pow(2)
                ref = reference.double().pow(2)
                w = _sequence_weights(batch, reference)
                if w is not None:
                    diff, ref = diff * w, ref * w
                error, norm = error + float(diff.sum()), norm + float(ref.sum())
        finally:
            restore()
        return error / max(norm, 1e-300)


def _sequence_weights(batch, t: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or t.ndim < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(torch.float64).reshape(*mask.shape, *([1] * (t.ndim - 2)))
