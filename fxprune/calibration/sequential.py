"""Sequential reconstruction: refit the consumers front to back on the pruned model's own inputs.

The one-shot refit (:mod:`fxprune.calibration.reconstruct`) fits every consumer to the original model's
inputs, but a consumer deep in the network sees inputs that earlier pruning (and earlier refits) changed.
Here each consumer ``y = W x + b`` that loses input columns is refit so that, fed with the PRUNED model's
inputs ``x_p`` (after every consumer upstream of it was refit), it reproduces the ORIGINAL model's output
for the same batch, computed from the original inputs ``x_o``. It is the ridge refit of
:mod:`fxprune.calibration.ridge` with ``o = x_o``, ``p = x_p`` and the one-shot refit ``[W1, b1]`` (what the
pruned model holds when this runs) as the weights it shrinks towards, the bias free::

    W' = W1 + (W C_op - W1 C_pp) (C_pp + lam I)^-1,      b' = b + W mu_o - W' mu_p

(``mu`` means, ``C`` centred moments over the calibration tokens; uncentred and no bias for a consumer without
one). The strength is chosen per consumer on held-out tokens (every fifth sequence), among the grid, ``inf``
(the one-shot weights, the bias corrected for the drift of the mean) and the one-shot refit unchanged, so on
those tokens the sequential refit is never worse than the one-shot one; ``damping=`` a number fixes it.
Rows of a pruned output axis are dropped (the kept output indices), and a convolution is the Linear
``W.reshape(out, -1)`` over its unfolded patches (the pruned graph's patches hold the kept channels only).
When ``x_o`` is a linear function of ``x_p`` (a pruned unit copies kept ones) this is the one-shot refit, and
exact (as the strength goes to 0).

Pairing needs the same token in both graphs: every calibration batch runs through the original graph and
the pruned graph; the inputs of the current stage's consumers are recorded for THIS batch only, folded into
the float64 cross-Gram ``sum x~_o x~_p^T`` and Gram ``sum x~_p x~_p^T`` on the activations' device, and
discarded; padding positions (a dict batch's 2-d ``attention_mask``) are left out. Consumers are ordered into
stages: a consumer's stage is 1 + the largest stage of the refit
consumers upstream of it in the original graph, so consumers of one stage never feed each other and one
pass over the batches (both graphs, each run only as far as the stage's last consumer) refits a whole stage
(a transformer block: about two stages). A layer called several times (shared weights) is one consumer, at
the stage of its last call. Buffers (BatchNorm running statistics of a model in training mode) of both
graphs are put back after each pass.

Consumers are found in the pruned graph by their weight's parameter name (rewrite and recompose keep
names). A consumer whose call is not a node of the pruned graph (an ``out_proj`` inside a recomposed
``nn.MultiheadAttention`` module) keeps its one-shot refit; consumers that lose no input column are left
as they are (as in the one-shot refit), even though their inputs may drift.

Example::

    >>> dg = fxprune.analyze(model, (x,))
    >>> pruned = fxprune.apply(dg, removal)
    >>> reconstruct_sequential(dg, removal, pruned, batches)     # refit in place, stage by stage
    ['2.weight', '2.bias', '4.weight', '4.bias']

A grouped convolution (solved block by block) and a mixture-of-experts weight (expert by expert, on the tokens the
original router sent it) keep their one-shot refit. The pairing and the solve are ``StagePairs``, shared with the
layer-by-layer refit of a checkpoint (``fxprune.io.checkpoint.layerwise``), which leaves expert weights out of its
statistics with a warning. ``prune`` turns a generator of batches into a list (read once per stage).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from fxprune.calibration.consumers import Consumer, _call
from fxprune.calibration.reconstruct import DAMPING, losing_consumers, warn_short
from fxprune.calibration.ridge import Choice, Moments, ridge_refit
from fxprune.calibration.statistics import placeholder_values, token_mask, token_rows


@dataclass
class SequentialPlan:
    """What the sequential refit needs from the original model, taken before rewriting (which may edit it).

    ``original``: the original graph (``dg.gm``, or a copy of it when pruning in place); ``consumers``:
    ``{weight name: Consumer}`` of the consumers that lose input columns (calls are nodes of ``original``);
    ``rows``: ``{weight name: kept output rows}``.
    """

    original: fx.GraphModule
    consumers: dict[str, Consumer]
    rows: dict[str, torch.Tensor]
    stages: list[list[str]] = field(default_factory=list)  # filled by run_sequential (the ones it refit)
    choices: dict = field(default_factory=dict)  # filled by run_sequential: {weight name: ridge Choice}


def plan_sequential(dg, removal: dict, inplace: bool = False) -> SequentialPlan:
    """Read, before rewriting, the consumers to refit and their kept output rows; with ``inplace=True`` (the
    rewrite will slice ``dg.gm`` itself) keep a copy of the original graph, whose outputs are the targets."""
    consumers, rows = {}, {}
    for name, consumer, _, kept_rows in losing_consumers(dg, removal):
        # a grouped convolution (solved block by block) and an expert weight (expert by expert, on the tokens the
        # original router sent it) keep their one-shot refit
        if consumer.blocks == 1 and not consumer.experts:
            consumers[name], rows[name] = consumer, kept_rows
    gm = dg.gm
    if inplace:
        gm = copy.deepcopy(dg.gm)
        nodes = dict(zip(dg.gm.graph.nodes, gm.graph.nodes))
        consumers = {name: replace(c, calls=[(nodes[n], nodes[x]) for n, x in c.calls])  # calls in the copy
                     for name, c in consumers.items()}
    return SequentialPlan(gm, consumers, rows)


def stages_of(gm: fx.GraphModule, consumers: dict[str, Consumer]) -> list[list[str]]:
    """The consumers (weight names) by stage: 1 + the largest stage of the given consumers upstream of a call.

    Example: in ``fc1 -> relu -> fc2 -> relu -> fc3`` with consumers fc2 and fc3: ``[["fc2.weight"],
    ["fc3.weight"]]``.
    """
    weight_of = {node: name for name, c in consumers.items() for node, _ in c.calls}
    level: dict[fx.Node, int] = {}
    stage: dict[str, int] = {}
    for node in gm.graph.nodes:  # topological order: every input was seen before
        before = max((level[n] for n in node.all_input_nodes), default=0)
        if node in weight_of:
            name = weight_of[node]
            stage[name] = max(stage.get(name, 0), before + 1)
            before = stage[name]
        level[node] = before
    out = [[] for _ in range(max(stage.values(), default=0))]
    for name in consumers:
        out[stage[name] - 1].append(name)
    return out


class _Stop(Exception):
    """Raised after a stage's last consumer call: the rest of the graph is not needed for this pass."""


class _Inputs(fx.Interpreter):
    """Runs a graph up to its last watched call, handing each watched call's features to ``take``."""

    def __init__(self, gm, watched: dict, take):
        super().__init__(gm)
        self.watched, self.take = watched, take  # watched: {call node: (weight name, input node, Consumer)}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.last = max(watched, key=order.__getitem__) if watched else None

    def run_node(self, n: fx.Node):
        if n in self.watched:
            name, source, consumer = self.watched[n]
            self.take(name, self.env[source], consumer)
        if n is self.last:
            raise _Stop
        return super().run_node(n)


def _run(gm, watched, take, batch) -> None:
    try:
        _Inputs(gm, watched, take).run(*placeholder_values(gm, batch), enable_io_processing=False)
    except _Stop:
        pass


def _pruned_calls(pruned: fx.GraphModule, names) -> dict:
    """``{weight name: [(call node, input node, Consumer with the call's unfold arguments)]}`` in ``pruned``."""
    out: dict[str, list] = {}
    for node in pruned.graph.nodes:
        call = _call(pruned, node)
        if call is None or call[1] not in names or not isinstance(call[0], fx.Node):
            continue
        x, weight, bias, patches, in_axis, blocks = call
        out.setdefault(weight, []).append((node, x, Consumer(weight, bias, patches, in_axis=in_axis, blocks=blocks)))
    return out


def _with_one(x: torch.Tensor, bias: bool) -> torch.Tensor:
    x = x.detach().double()
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x


def run_sequential(plan: SequentialPlan, pruned: fx.GraphModule, batches, damping: float | None = None,
                   progress=None) -> list[str]:
    """Refit, in ``pruned``, the plan's consumers stage by stage; returns the refit parameter names.

    ``batches`` is iterated once per stage (a list, not a generator). ``progress``: ``True``/``False`` forces
    the tqdm bar on or off; ``None`` shows it on a terminal.
    """
    if batches is None:
        raise ValueError("sequential reconstruction needs calibration batches: pass calibration=[batch, ...]")
    if isinstance(batches, Iterator):
        raise ValueError("sequential reconstruction runs over the calibration batches once per stage: pass a list "
                         "of batches, not an iterator or generator")
    dropout = [n for n, m in plan.original.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
               and m.training and m.p > 0]
    if dropout:
        warnings.warn(f"fxprune: sequential reconstruction runs dropout in training mode ({', '.join(dropout[:3])}): "
                      "the original and the pruned model drop different units, so the inputs it pairs differ by "
                      "more than the pruning; put the model in eval mode first", stacklevel=2)
    calls = _pruned_calls(pruned, plan.consumers)
    consumers = {name: c for name, c in plan.consumers.items() if name in calls}
    plan.stages = stages_of(plan.original, consumers)
    params = dict(pruned.named_parameters(remove_duplicate=False))
    original = dict(plan.original.named_parameters(remove_duplicate=False))
    done = []
    total = len(plan.stages) * len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(total=total, desc="fxprune sequential reconstruction",
               disable=None if progress is None else not progress)
    try:
        for stage in plan.stages:
            done += _refit_stage(plan, stage, consumers, calls, pruned, params, original, batches, damping, bar)
    finally:
        bar.close()
    return done


def _refit_stage(plan, stage, consumers, calls, pruned, params, original, batches, damping, bar) -> list[str]:
    """One pass over the batches through both graphs for the consumers of one stage, then their refit."""
    watched_o = {n: (name, x, consumers[name]) for name in stage for n, x in consumers[name].calls}
    watched_p = {n: (name, x, c) for name in stage for n, x, c in calls[name]}
    pairs = StagePairs(stage, consumers)
    original_input = lambda name, value, consumer: pairs.original(name, value)  # noqa: E731
    saved = [{k: b.detach().clone() for k, b in gm.named_buffers()} for gm in (plan.original, pruned)]
    try:
        with torch.no_grad():
            for batch in batches:
                pairs.begin(token_mask(batch))
                _run(plan.original, watched_o, original_input, batch)
                _run(pruned, watched_p, pairs.pruned, batch)
                bar.update(1)
    finally:
        with torch.no_grad():
            for gm, buffers in zip((plan.original, pruned), saved):
                for k, b in gm.named_buffers():
                    b.copy_(buffers[k])
    done = pairs.refit(original, params, plan.rows, damping)
    plan.choices.update(pairs.choices)
    return done


class StagePairs:
    """The float64 cross-Gram ``sum x~_o x~_p^T`` and Gram ``sum x~_p x~_p^T`` of one stage's consumers (and over
    the held-out tokens, also ``sum x~_o x~_o^T``), fed one batch at a time (the original graph's inputs first,
    then the pruned graph's, paired call by call; padding rows of the batch's mask left out), and the validated
    refit they give. Shared by :func:`run_sequential` (whole graphs) and the layer-by-layer refit of a checkpoint
    (:mod:`fxprune.io.checkpoint.layerwise`: one decoder layer at a time).

    Example::

        >>> pairs = StagePairs(["fc2.weight"], consumers)
        >>> pairs.begin(mask); pairs.original("fc2.weight", x_o); pairs.pruned("fc2.weight", x_p, pruned_consumer)
        >>> pairs.refit(original_tensors, pruned_tensors, rows)   # writes into pruned_tensors
        ['fc2.weight', 'fc2.bias']
        >>> pairs.choices["fc2.weight"].strength
        0.01
    """

    def __init__(self, stage: list[str], consumers: dict[str, Consumer]):
        self.stage, self.consumers = stage, consumers
        self.cross, self.gram, self.tokens, self.count = {}, {}, {}, 0
        self.held_cross, self.held_gram, self.held_oo, self.held = {}, {}, {}, {}
        self.inputs, self.position, self.mask = {}, {}, None
        self.choices: dict[str, Choice] = {}

    def begin(self, mask: torch.Tensor | None = None) -> None:
        """A new batch (``mask``: its attention mask, or None): its original inputs are recorded, then paired with
        the pruned ones, then dropped."""
        self.inputs = {name: [] for name in self.stage}  # this batch's original inputs, per call
        self.position = dict.fromkeys(self.stage, 0)
        self.mask = mask
        self.count += 1

    def original(self, name: str, value: torch.Tensor) -> None:
        """The input the original graph's call of ``name`` reads (the tensor, not its features)."""
        self.inputs[name].append(token_rows(self.consumers[name], value, self.mask))

    def pruned(self, name: str, value: torch.Tensor, consumer: Consumer) -> None:
        """The input the pruned graph's matching call reads; ``consumer``: that call's (its unfold arguments)."""
        bias = self.consumers[name].bias is not None
        x_o, held = self.inputs[name][self.position[name]]
        self.inputs[name][self.position[name]] = None  # discarded as soon as it is paired
        self.position[name] += 1
        x_o, x_p = _with_one(x_o, bias), _with_one(token_rows(consumer, value, self.mask)[0], bias)
        if x_o.shape[0] != x_p.shape[0]:
            raise ValueError(f"sequential reconstruction: {name} sees {x_o.shape[0]} tokens in the "
                             f"original model and {x_p.shape[0]} in the pruned one")
        if name not in self.gram:
            self.cross[name] = x_o.new_zeros(x_o.shape[1], x_p.shape[1])
            self.gram[name] = x_p.new_zeros(x_p.shape[1], x_p.shape[1])
            self.held_cross[name], self.held_gram[name] = torch.zeros_like(self.cross[name]), torch.zeros_like(
                self.gram[name])
            self.held_oo[name] = x_o.new_zeros(x_o.shape[1], x_o.shape[1])
            self.tokens[name], self.held[name] = 0, 0
        self.cross[name] += x_o.T @ x_p
        self.gram[name] += x_p.T @ x_p
        self.tokens[name] += x_o.shape[0]
        held = held.to(x_o.device)
        h_o, h_p = x_o[held], x_p[held]
        self.held_cross[name] += h_o.T @ h_p
        self.held_gram[name] += h_p.T @ h_p
        self.held_oo[name] += h_o.T @ h_o
        self.held[name] += h_o.shape[0]

    def refit(self, original: dict, params: dict, rows: dict, damping: float | None = None) -> list[str]:
        """Solve every consumer of the stage from ``original`` (``{name: tensor}`` of the original weights and
        biases), shrunk towards the current ``params`` (the pruned ones, same names: the one-shot refit) and
        copy the result into ``params``; returns the names written. ``damping``: None validates the strength
        on the held-out tokens (the current weights are a candidate, so on those tokens the result is never
        worse than them), a number fixes it. ``self.choices`` gets what was chosen per consumer."""
        if self.count == 0:
            raise ValueError("calibration data is empty: pass at least one batch")
        done = []
        with torch.no_grad():
            for name in self.stage:
                if name not in self.gram:
                    continue  # no token reached this consumer (every position padding)
                c, weight, target = self.consumers[name], original[name], params[name]
                dev = self.gram[name].device
                keep = rows[name].to(dev)
                w = c.matrices(weight.detach())[0].double().to(dev).index_select(0, keep)  # (out, features)
                b = original[c.bias].detach().double().to(dev).index_select(0, keep) if c.bias is not None else None
                w1 = c.matrices(target.detach())[0].double().to(dev)
                b1 = params[c.bias].detach().double().to(dev) if c.bias is not None else None
                if w1.shape != (w.shape[0], self.gram[name].shape[0] - (b is not None)):
                    raise ValueError(f"sequential reconstruction: {name} has {tuple(w1.shape)} entries in the pruned "
                                     f"model where its inputs there have {self.gram[name].shape[0]} features")
                every = Moments.of_sums(self.tokens[name], self.gram[name], self.cross[name])
                held = Moments.of_sums(self.held[name], self.held_gram[name], self.held_cross[name],
                                       self.held_oo[name])
                new_w, new_b, self.choices[name] = ridge_refit(w, b, w1, b1, every.minus(held), held, every,
                                                               strength=damping, default=DAMPING)
                new_w = new_w.T if c.in_axis == 0 else new_w  # back to the weight's own layout
                target.copy_(new_w.reshape(target.shape).to(target.device, target.dtype))
                done.append(name)
                if c.bias is not None:
                    params[c.bias].copy_(new_b.to(params[c.bias].device, params[c.bias].dtype))
                    done.append(c.bias)
        return done


def reconstruct_sequential(dg, removal: dict, pruned: fx.GraphModule, batches, damping: float | None = None,
                           progress=None) -> list[str]:
    """Refit, in ``pruned`` (``fxprune.apply(dg, removal)``), every consumer that lost input columns, front to
    back on the pruned model's inputs; returns the refit parameter names. Consumers whose call is not a node of
    ``pruned`` are left as they are (``fxprune.prune(..., sequential=True)`` gives them the one-shot refit)."""
    return run_sequential(plan_sequential(dg, removal), pruned, batches, damping, progress)
