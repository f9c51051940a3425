"""Reconstruction after depth pruning: the layers next to a removed branch absorb what it did.

When a branch ``f`` is removed, everything downstream sees the stream ``x`` instead of ``x + f(x)``. Two kinds of
layers are refit on calibration batches run through the original graph and the depth-pruned one, paired token
by token (the machinery of :mod:`fxprune.calibration.sequential`):

1. **the next consumers of the stream**: the calibrated consumers (Linear, weight matmul, convolution) reached
   from the stream that replaced the removed output without crossing another residual add (the next layer's
   q/k/v or gate/up projections after its norm; the head after the final norm when the last layer went). Each is
   refit to reproduce the original model's output of that layer from the pruned model's input:
   ``[W', b'] = [W, b] E[x~_o x~_p^T] (E[x~_p x~_p^T] + lam I)^-1`` (``StagePairs``);
2. **the next writer of the stream**: when the next kept branch ends in such a layer (``o_proj``, ``down_proj``:
   its output is what the add adds), it is refit, after step 1, so that the stream after its add matches the
   original stream there, which still holds the removed branch's contribution: with ``h_p`` its input in the
   pruned model, ``y_o`` the original stream after the add and ``x_p`` the pruned stream before it, the target
   is ``t = y_o - x_p`` and ``[W', b'] = (E[t h~_p^T] + lam [W, b]) (E[h~_p h~_p^T] + lam I)^-1`` (the ridge pulls
   towards the weights it had, as in :func:`~fxprune.calibration.reconstruct.refit`).

Removed branches that share one stream (two in a row) are one site. Sites are refit in graph order, each after
the earlier ones (two passes over the batches per site). Names of parameters are the analysed graph's; the
result is ``{name: tensor}`` for :func:`~fxprune.calibration.reconstruct.load_refit`.

Example::

    >>> pruned = remove_depth(dg, plan.branches)
    >>> refit = refit_after_depth(dg, pruned, plan.removed, batches)     # also written into `pruned`
    >>> sorted(refit)[:2]
    ['model.layers.2.mlp.down_proj.weight', 'model.layers.2.mlp.gate_proj.weight']
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.analysis.branches import RESIDUAL, alias_root
from fxprune.calibration.consumers import Consumer, _call
from fxprune.calibration.reconstruct import DAMPING
from fxprune.calibration.sequential import StagePairs, _with_one
from fxprune.calibration.statistics import placeholder_values, token_mask


def _consumers_at(gm: fx.GraphModule, node: fx.Node) -> dict[str, tuple]:
    """``{weight name: (call node, input node, Consumer)}`` of the consumers reached from ``node`` without crossing
    a residual add."""
    found, todo, seen = {}, [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen or u.op == "output":
                continue
            seen.add(u)
            call = _call(gm, u)
            if call is not None and isinstance(call[0], fx.Node):
                x, weight, bias, patches, in_axis, blocks = call
                found.setdefault(weight, (u, x, Consumer(weight, bias, patches, in_axis=in_axis, blocks=blocks)))
                continue
            if RESIDUAL in u.meta:
                continue
            todo.append(u)
    return found


class _Capture(fx.Interpreter):
    """Runs a graph and hands ``take(name, value)`` the values of the watched nodes (``{node: name}``), stopping
    after the last one."""

    def __init__(self, gm, watched: dict, take):
        super().__init__(gm)
        self.watched, self.take = watched, take
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.last = max(watched, key=order.__getitem__) if watched else None

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.watched:
            for name in self.watched[n]:
                self.take(name, value)
        if n is self.last:
            raise StopIteration
        return value


def _run(gm, watched, take, batch) -> None:
    try:
        with torch.no_grad():
            _Capture(gm, watched, take).run(*placeholder_values(gm, batch), enable_io_processing=False)
    except StopIteration:
        pass


def refit_after_depth(dg, pruned: fx.GraphModule, removed, batches, damping: float = DAMPING) -> dict:
    """Refit the layers next to each removed branch or layer in ``pruned`` (see module docstring); returns
    ``{parameter name: refit tensor}`` (also written into ``pruned``)."""
    if batches is None:
        raise ValueError("reconstruct=True after depth pruning needs calibration batches: pass calibration=[...]")
    batches = list(batches)
    original_nodes = {n.name: n for n in dg.gm.graph.nodes}
    pruned_nodes = {n.name: n for n in pruned.graph.nodes}
    # the stream standing for each removed output in the pruned graph (chains of removed blocks collapse)
    replaced = {}
    for item in removed:
        out, stream = (item.add, item.stream) if hasattr(item, "add") else (item.output, item.input)
        replaced[out] = stream
    sites = []
    for stream in replaced.values():
        while stream in replaced:
            stream = replaced[stream]
        if stream in pruned_nodes and stream not in sites:
            sites.append(stream)
    order = {n.name: i for i, n in enumerate(pruned.graph.nodes)}
    sites.sort(key=order.__getitem__)
    kept = [b for b in dg.branches if b.removable and b.add in pruned_nodes]
    params = dict(pruned.named_parameters(remove_duplicate=False))
    original = dict(dg.gm.named_parameters(remove_duplicate=False))
    done: dict[str, torch.Tensor] = {}
    for stream in sites:
        node = pruned_nodes[stream]
        writer = _next_writer(pruned, node, kept, pruned_nodes)
        readers = _consumers_at(pruned, node)
        # a layer that reads the stream and writes the next add (a branch of one Linear) is refit as the writer:
        # reproducing its old output would leave out the removed branch's contribution
        readers = {w: c for w, c in readers.items() if w in params and w in original and w not in done
                   and (writer is None or w != writer[0])}
        if readers:
            done.update(_refit_readers(dg, pruned, readers, original_nodes, params, original, batches, damping))
        if writer is not None and writer[0] not in done:
            done.update(_refit_writer(dg, pruned, writer, original_nodes, params, original, batches, damping))
    return done


def _refit_readers(dg, pruned, readers, original_nodes, params, original, batches, damping) -> dict:
    consumers = {w: c[2] for w, c in readers.items()}
    watched_p = {}
    watched_o = {}
    for w, (call, x, _) in readers.items():
        watched_p.setdefault(x, []).append(w)
        if x.name not in original_nodes:
            return {}
        watched_o.setdefault(original_nodes[x.name], []).append(w)
    pairs = StagePairs(list(readers), consumers)
    for batch in batches:
        pairs.begin(token_mask(batch))  # padding positions left out of both graphs' rows
        _run(dg.gm, watched_o, pairs.original, batch)
        _run(pruned, watched_p, lambda w, v: pairs.pruned(w, v, consumers[w]), batch)
    rows = {w: torch.arange(params[w].shape[consumers[w].out_axis]) for w in readers}
    names = pairs.refit(original, params, rows, damping)
    return {n: params[n].detach().clone() for n in names}


def _next_writer(pruned, stream: fx.Node, kept, nodes):
    """``(weight name, add node, stream operand node, call node, input node, Consumer)`` of the next kept branch
    whose add reads ``stream`` as its stream and whose output is a calibrated consumer's call."""
    for b in kept:
        add, branch_out = nodes[b.add], nodes.get(b.output)
        operands = [a for a in add.args if isinstance(a, fx.Node) and a is not branch_out]
        if branch_out is None or len(operands) != 1 or alias_root(operands[0]) is not alias_root(stream):
            continue
        operand = operands[0]
        out = alias_root(nodes[b.output])
        call = _call(pruned, out)
        if call is None or not isinstance(call[0], fx.Node) or call[3] is not None:
            continue
        x, weight, bias, _, in_axis, blocks = call
        return weight, add, operand, out, x, Consumer(weight, bias, None, in_axis=in_axis, blocks=blocks)
    return None


def _refit_writer(dg, pruned, writer, original_nodes, params, original, batches, damping) -> dict:
    weight, add, operand, call, x, consumer = writer
    if add.name not in original_nodes:
        return {}
    bias = consumer.bias is not None
    cross = gram = None
    for batch in batches:
        seen: dict = {}
        _run(dg.gm, {original_nodes[add.name]: ["y_o"]}, lambda k, v: seen.__setitem__(k, v), batch)
        watched = {operand: ["x_p"]}
        watched.setdefault(x, []).append("h_p")  # a branch of one layer reads the stream itself
        _run(pruned, watched, lambda k, v: seen.__setitem__(k, v), batch)
        h = _with_one(consumer.features(seen["h_p"]), bias)
        t = (seen["y_o"] - seen["x_p"]).detach().double().reshape(-1, seen["y_o"].shape[-1])
        if cross is None:
            cross, gram = t.new_zeros(t.shape[1], h.shape[1]), h.new_zeros(h.shape[1], h.shape[1])
        cross += t.T @ h
        gram += h.T @ h
    w = consumer.matrices(original[weight].detach())[0].double().to(gram.device)
    if bias:
        w = torch.cat([w, original[consumer.bias].detach().double().to(w.device)[:, None]], 1)
    lam = damping * gram.diagonal().mean().clamp_min(1e-300)
    inner = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    fitted = torch.linalg.solve(inner, (cross + lam * w).T).T
    new_w = fitted[:, :-1] if bias else fitted
    target = params[weight]
    new_w = new_w.T if consumer.in_axis == 0 else new_w
    out = {}
    with torch.no_grad():
        target.copy_(new_w.reshape(target.shape).to(target.device, target.dtype))
        out[weight] = target.detach().clone()
        if bias:
            params[consumer.bias].copy_(fitted[:, -1].to(params[consumer.bias].device, params[consumer.bias].dtype))
            out[consumer.bias] = params[consumer.bias].detach().clone()
    return out
