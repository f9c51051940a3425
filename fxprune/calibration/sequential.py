"""Sequential reconstruction: refit the consumers front to back on the pruned model's own inputs.

The one-shot refit (:mod:`fxprune.calibration.reconstruct`) fits every consumer to the original model's
inputs, but a consumer deep in the network sees inputs that earlier pruning (and earlier refits) changed.
Here each consumer ``y = W x + b`` that loses input columns is refit so that, fed with the PRUNED model's
inputs ``x_p`` (after every consumer upstream of it was refit), it reproduces the ORIGINAL model's output
for the same batch, computed from the original inputs ``x_o``. With ``x~ = [x, 1]`` (the constant for the
bias), the ridge least-squares solution of ``min E|| [W', b'] x~_p - [W, b] x~_o ||^2`` is::

    [W', b'] = [W, b] E[x~_o x~_p^T] (E[x~_p x~_p^T] + lam I)^-1,    lam = damping * mean(diag E[x~_p x~_p^T])

(the damping convention of :func:`~fxprune.calibration.reconstruct.refit`). Rows of a pruned output axis
are dropped (the kept output indices), a consumer without a bias gets no bias (no constant column), and a
convolution is the Linear ``W.reshape(out, -1)`` over its unfolded patches (the pruned graph's patches hold
the kept channels only). When ``x_o`` is a linear function of ``x_p`` (a pruned unit copies kept ones) this
is the one-shot refit, and exact.

Pairing needs the same token in both graphs: every calibration batch runs through the original graph and
the pruned graph; the inputs of the current stage's consumers are recorded for THIS batch only, folded into
the float64 cross-Gram ``sum x~_o x~_p^T`` and Gram ``sum x~_p x~_p^T`` on the activations' device, and
discarded. Consumers are ordered into stages: a consumer's stage is 1 + the largest stage of the refit
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
from fxprune.calibration.reconstruct import DAMPING, losing_consumers
from fxprune.calibration.statistics import placeholder_values


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
            self.take(name, consumer.features(self.env[source]))
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


def _solve(target: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``target @ cross @ (gram + lam I)^-1`` with ``lam = damping * mean(diag gram)``."""
    lam = damping * gram.diagonal().mean().clamp_min(1e-300)
    inner = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(inner, (target @ cross).T).T  # inner is symmetric


def run_sequential(plan: SequentialPlan, pruned: fx.GraphModule, batches, damping: float = DAMPING,
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
    saved = [{k: b.detach().clone() for k, b in gm.named_buffers()} for gm in (plan.original, pruned)]
    try:
        with torch.no_grad():
            for batch in batches:
                pairs.begin()
                _run(plan.original, watched_o, pairs.original, batch)
                _run(pruned, watched_p, pairs.pruned, batch)
                bar.update(1)
    finally:
        with torch.no_grad():
            for gm, buffers in zip((plan.original, pruned), saved):
                for k, b in gm.named_buffers():
                    b.copy_(buffers[k])
    return pairs.refit(original, params, plan.rows, damping)


class StagePairs:
    """The float64 cross-Gram ``sum x~_o x~_p^T`` and Gram ``sum x~_p x~_p^T`` of one stage's consumers, fed one
    batch at a time (the original graph's inputs first, then the pruned graph's, paired call by call), and the
    refit they give. Shared by :func:`run_sequential` (whole graphs) and the layer-by-layer refit of a checkpoint
    (:mod:`fxprune.io.checkpoint.layerwise`: one decoder layer at a time).

    Example::

        >>> pairs = StagePairs(["fc2.weight"], consumers)
        >>> pairs.begin(); pairs.original("fc2.weight", x_o); pairs.pruned("fc2.weight", x_p)
        >>> pairs.refit(original_tensors, pruned_tensors, rows, damping=1e-4)   # writes into pruned_tensors
        ['fc2.weight', 'fc2.bias']
    """

    def __init__(self, stage: list[str], consumers: dict[str, Consumer]):
        self.stage, self.consumers = stage, consumers
        self.cross, self.gram, self.count = {}, {}, 0
        self.inputs, self.position = {}, {}

    def begin(self) -> None:
        """A new batch: its original inputs are recorded, then paired with the pruned ones, then dropped."""
        self.inputs = {name: [] for name in self.stage}  # this batch's original inputs, per call
        self.position = dict.fromkeys(self.stage, 0)
        self.count += 1

    def original(self, name: str, x_o: torch.Tensor) -> None:
        self.inputs[name].append(x_o)

    def pruned(self, name: str, x_p: torch.Tensor) -> None:
        bias = self.consumers[name].bias is not None
        x_o = _with_one(self.inputs[name][self.position[name]], bias)
        self.inputs[name][self.position[name]] = None  # discarded as soon as it is paired
        self.position[name] += 1
        x_p = _with_one(x_p, bias)
        if x_o.shape[0] != x_p.shape[0]:
            raise ValueError(f"sequential reconstruction: {name} sees {x_o.shape[0]} tokens in the "
                             f"original model and {x_p.shape[0]} in the pruned one")
        if name not in self.gram:
            self.cross[name] = x_o.new_zeros(x_o.shape[1], x_p.shape[1])
            self.gram[name] = x_p.new_zeros(x_p.shape[1], x_p.shape[1])
        self.cross[name] += x_o.T @ x_p
        self.gram[name] += x_p.T @ x_p

    def refit(self, original: dict, params: dict, rows: dict, damping: float) -> list[str]:
        """Solve every consumer of the stage from ``original`` (``{name: tensor}`` of the original weights and
        biases) and copy the result into ``params`` (the pruned ones, same names); returns the names written."""
        if self.count == 0:
            raise ValueError("calibration data is empty: pass at least one batch")
        done = []
        with torch.no_grad():
            for name in self.stage:
                c, weight, target = self.consumers[name], original[name], params[name]
                gram = self.gram[name]
                w = c.matrices(weight.detach())[0].double().to(gram.device)  # (out, features); x @ W: W.T
                if c.bias is not None:
                    w = torch.cat([w, original[c.bias].detach().double().to(w.device)[:, None]], 1)
                fitted = _solve(w.index_select(0, rows[name].to(gram.device)), self.cross[name], gram, damping)
                new_w = fitted[:, :-1] if c.bias is not None else fitted
                if new_w.numel() != target.numel():
                    raise ValueError(f"sequential reconstruction: refit {name} has {tuple(new_w.shape)} entries "
                                     f"where the pruned weight is {tuple(target.shape)}")
                new_w = new_w.T if c.in_axis == 0 else new_w  # back to the weight's own layout
                target.copy_(new_w.reshape(target.shape).to(target.device, target.dtype))
                done.append(name)
                if c.bias is not None:
                    params[c.bias].copy_(fitted[:, -1].to(params[c.bias].device, params[c.bias].dtype))
                    done.append(c.bias)
        return done


def reconstruct_sequential(dg, removal: dict, pruned: fx.GraphModule, batches, damping: float = DAMPING,
                           progress=None) -> list[str]:
    """Refit, in ``pruned`` (``fxprune.apply(dg, removal)``), every consumer that lost input columns, front to
    back on the pruned model's inputs; returns the refit parameter names. Consumers whose call is not a node of
    ``pruned`` are left as they are (``fxprune.prune(..., sequential=True)`` gives them the one-shot refit)."""
    return run_sequential(plan_sequential(dg, removal), pruned, batches, damping, progress)
