"""Reconstruction: refit each calibrated consumer's kept columns and bias by ridge least squares.

After pruning, consumer ``y = W x + b`` sees only the kept input columns S (``W`` is the consumer's matrix,
see :mod:`fxprune.calibration.consumers`: ``W.T`` for ``x @ W`` and GPT-2's addmm, ``W.reshape(out, -1)``
over the patches for a convolution, where a kept channel keeps its ``prod(kernel)`` columns).
With ``mu`` the mean and ``C`` the centred covariance of the consumer's inputs over the calibration tokens
(padding left out), U the removed columns, the refit is the ridge regression of the removed columns' part of
the output on the kept ones, the bias free (:mod:`fxprune.calibration.ridge`)::

    W_S' = W_S + W_U C[U, S] (C[S, S] + lam I)^-1,      b' = b + W_U mu_U - (W_S' - W_S) mu_S

so a removed column that is a linear combination of kept ones (plus a constant) is moved onto them
exactly (as ``lam -> 0``), and a removed column's mean goes into the bias (all ``lam``; ``lam -> inf`` is
that bias compensation alone, FLAP's). ``lam = strength * mean(diag C[S, S])``, and the strength is chosen
per consumer on held-out calibration tokens (every fifth sequence: the refit that predicts them best, fitted
on the others, among :data:`~fxprune.calibration.ridge.GRID`, ``inf`` and the unrefit weights), then the
refit is solved on every token at that strength. A consumer that saw fewer calibration tokens than it keeps
inputs gets a warning with the counts (its validated strength shrinks it towards the unrefit weights).
``damping=`` a number fixes the strength instead (no validation). What was chosen, per consumer, and its
held-out error before and after (relative to the held-out variance of the original output) are returned
in ``report`` (``fxprune.prune`` puts them in ``result.meta["fxprune_refit"]["one-shot"]``). A consumer without
a bias uses uncentred moments and gets no bias. Rows of an output axis that was pruned too are refit and then
sliced like the weight. A grouped convolution is solved block by block: output block b
from block b's kept columns and its own Gram matrix (a kept channel rank keeps its column in every
block). A mixture-of-experts weight (``Consumer.experts``) is solved expert by expert: expert e's kept
columns from the Gram of the tokens routed to it (an expert no calibration token picked keeps its columns as
they were); removed experts are dropped, not refit (their router rows are sliced: the router loses outputs,
not inputs). Depthwise convolutions are not calibrated (nothing to refit). Consumers whose weight is tied (one
tensor under several names) are left alone: refitting one use would change the other.

Every consumer is refit from the original model's inputs (one-shot, not layer by layer), so this is
exact for a consumer whose kept inputs are unchanged by the pruning (its producers were not refit). Through
``fxprune.prune``, each consumer's refit is then kept only if it brings the whole model's output closer to the
original's on the held-out calibration sequences (:mod:`fxprune.calibration.output_check`): a layer's own
error is not what the layers after it make of it.

Example::

    >>> dg = fxprune.analyze(model, (x,))
    >>> pruned = fxprune.apply(dg, removal)
    >>> reconstruct(dg, removal, pruned, batches)     # refit in place; returns the refit parameter names
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.ridge import Choice, Moments, ridge_refit
from fxprune.calibration.statistics import collect_statistics
from fxprune.analysis.removal import kept_units
from fxprune.rewriting.rewrite import Sizes

DAMPING = 1e-4  # the fixed ridge strength of OBS's inverse, and of a refit with nothing held out


def _moments(sums: torch.Tensor, count: int, cols: torch.Tensor, bias: bool) -> Moments:
    """The one-shot refit's moments from a ``(d + 1)`` Gram sum: ``p`` the kept columns, ``o`` every column."""
    d = sums.shape[0] - 1
    rows = torch.arange(d + 1 if bias else d, device=sums.device)
    cols = torch.cat([cols, torch.tensor([d], device=sums.device)]) if bias else cols
    return Moments.of_sums(count, sums[cols][:, cols], sums[rows][:, cols], sums[rows][:, rows])


def validated_refit(weight: torch.Tensor, bias: torch.Tensor | None, gram_sum: torch.Tensor, count: int,
                    held_sum: torch.Tensor | None, held: int, kept: torch.Tensor, damping: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, Choice]:
    """The refit ``(W[:, kept]', b', Choice)`` of ``y = W x + b`` (float64) from the ``(d + 1)`` Gram sums of
    ``[x, 1]`` over ``count`` tokens and over the ``held`` held-out ones among them; the strength validated on
    those (see the module), or ``damping`` when given."""
    dev = gram_sum.device
    kept = kept.to(dev)
    every = _moments(gram_sum, count, kept, bias is not None)
    held_m = _moments(held_sum, held, kept, bias is not None) if held_sum is not None and held else None
    train = every.minus(held_m) if held_m is not None else every
    w = weight.detach().double().to(dev)
    b = bias.detach().double().to(dev) if bias is not None else None
    return ridge_refit(w, b, w[:, kept], b, train, held_m, every, strength=damping, default=DAMPING)


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: torch.Tensor,
          damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The refit ``(W[:, kept]', b')`` of ``y = W x + b`` (float64) from the ``(d + 1)`` Gram ``E[x~ x~^T]`` of
    ``[x, 1]``, at a fixed strength ``damping`` (no validation)."""
    w_new, b_new, _ = validated_refit(weight, bias, gram, 1, None, 0, kept, damping)
    return w_new, b_new


def losing_consumers(dg, removal: dict) -> list[tuple]:
    """``(weight name, Consumer, kept input indices, kept output rows)`` of every calibrated consumer that loses
    input columns under ``removal``, read from the original graph (``dg.gm``). A weight tied under several names
    is left out: refitting one use would change the other."""
    sizes = Sizes(dg.solver, kept_units(dg, removal))
    original = dict(dg.gm.named_parameters(remove_duplicate=False))
    uses = Counter(id(p) for p in original.values())
    out = []
    for name, consumer in calibrated_consumers(dg).items():
        weight = original[name]
        kept_in = torch.as_tensor(sizes.indices(dg.layout_of(name, consumer.in_axis)))
        if uses[id(weight)] > 1 or len(kept_in) == weight.shape[consumer.in_axis]:
            continue
        out.append((name, consumer, kept_in, torch.as_tensor(sizes.indices(dg.layout_of(name, consumer.out_axis)))))
    return out


def refit_groups(dg, removal: dict, refit: dict) -> list[tuple[str, list[str]]]:
    """``[(weight name, [its refit parameter names: the weight, its bias])]`` of the consumers in ``refit``, in
    graph order (the order :func:`fxprune.calibration.output_check.check_refits` tries them)."""
    order = {n: i for i, n in enumerate(dg.gm.graph.nodes)}
    out = []
    for name, consumer, _, _ in losing_consumers(dg, removal):
        names = [n for n in (name, consumer.bias) if n and n in refit]
        if names:
            first = min((order.get(node, len(order)) for node, _ in consumer.calls), default=len(order))
            out.append((first, name, names))
    return [(name, names) for _, name, names in sorted(out, key=lambda t: t[0])]


def refit_consumers(dg, removal: dict, batches, damping: float | None = None, progress=None,
                    report: dict | None = None) -> dict:
    """``{parameter name: refit tensor}``, already sliced to the pruned shape, for every calibrated
    consumer that loses input columns under ``removal``. Reads only the original model (``dg.gm``), so it
    runs before rewriting (which may edit ``dg.gm`` in place). ``damping``: None validates each refit's
    strength on held-out tokens, a number fixes it. ``report``, a dict, receives ``{weight name: choice}``
    (:meth:`~fxprune.calibration.ridge.Choice.as_dict`; a list of them, ``{"blocks": [...]}`` or
    ``{"experts": [...]}``, for a grouped convolution or an expert weight)."""
    if batches is None:
        raise ValueError("reconstruct=True needs calibration batches: pass calibration=[batch, ...] "
                         "(a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs)")
    stats = collect_statistics(dg, batches, gram=True, progress=progress)
    original = dict(dg.gm.named_parameters(remove_duplicate=False))
    out, report, short = {}, {} if report is None else report, []
    for name, consumer, kept_in, rows in losing_consumers(dg, removal):
        if name not in stats:
            continue
        weight = original[name]
        bias = original[consumer.bias] if consumer.bias else None
        if consumer.experts:
            out[name], choices = _refit_experts(dg, removal, consumer, weight, stats[name], kept_in, rows, damping)
            report[name] = {"experts": [c.as_dict() if c else None for c in choices]}
            short += [(f"{name}[{e}]", c) for e, c in enumerate(choices) if c and c.tokens < c.width]
            continue
        kernel = consumer.kernel  # kernel positions per input channel (1 for a Linear or matmul)
        columns = (kept_in[:, None] * kernel + torch.arange(kernel)).reshape(-1)
        biases = bias.chunk(consumer.blocks) if bias is not None else [None] * consumer.blocks
        s = stats[name]
        fits = [validated_refit(m, b, *_block(s, i), columns, damping)  # a block reads its own features only
                for i, (m, b) in enumerate(zip(consumer.matrices(weight), biases))]
        choices = [c for _, _, c in fits]
        report[name] = choices[0].as_dict() if len(choices) == 1 else {"blocks": [c.as_dict() for c in choices]}
        short += [(name, c) for c in choices[:1] if c.tokens < c.width]
        matrix = torch.cat([w for w, _, _ in fits])  # (out, kept columns)
        if consumer.in_axis == 0:  # x @ W: the weight is (in, out)
            w_new = matrix.T
        else:
            w_new = matrix.reshape(weight.shape[0], len(kept_in), *weight.shape[2:])
        out[name] = w_new.index_select(consumer.out_axis, rows.to(w_new.device)).contiguous().to(weight.device,
                                                                                               weight.dtype)
        if bias is not None:  # the bias's axis is the weight's output axis
            b_new = torch.cat([b for _, b, _ in fits])
            out[consumer.bias] = b_new.index_select(0, rows.to(b_new.device)).to(bias.device, bias.dtype)
    warn_short(short, "reconstruct")
    return out


def _block(stats, b: int) -> tuple:
    """``(gram_sum, count, held_sum, held)`` of block b of one consumer's statistics."""
    every, held = stats.block_sums(b)
    return every, stats.count, held, stats.held


def warn_short(short: list, what: str) -> None:
    """One warning naming the consumers (``(name, Choice)``) that saw fewer calibration tokens than they keep
    inputs: their refits rest on few data (validation shrinks them towards the unrefit weights; a fixed strength
    may fit the tokens' noise)."""
    if not short:
        return
    shown = "; ".join(f"{name}: {c.tokens} tokens for {c.width} kept inputs" for name, c in short[:3])
    validated = all(c.error_after is not None for _, c in short)
    how = ("their refits are shrunk towards the unrefit weights as far as the held-out tokens ask" if validated else
           "a refit at a fixed strength may fit the calibration tokens' noise (damping=None validates it)")
    warnings.warn(f"fxprune: {what}: {len(short)} layer(s) saw fewer calibration tokens than they keep inputs "
                  f"({shown}{' ...' if len(short) > 3 else ''}); {how}; more calibration data would let them refit "
                  f"more", stacklevel=4)


def _refit_experts(dg, removal, consumer, weight, stats, kept_in, rows, damping) -> tuple[torch.Tensor, list]:
    """An expert weight refit expert by expert on each one's tokens, sliced to the kept experts, columns, rows;
    and each kept expert's :class:`Choice` (None for an expert no token reached)."""
    experts = torch.as_tensor(Sizes(dg.solver, kept_units(dg, removal)).indices(dg.layout_of(consumer.weight, 0)))
    matrices, fits, choices = consumer.matrices(weight.detach()), [], []
    for e in experts.tolist():
        s = stats.experts[e]
        if s.count:
            w_new, _, choice = validated_refit(matrices[e], None, *_block(s, 0), kept_in, damping)
            fits.append(w_new)
            choices.append(choice)
        else:  # no calibration token reached this expert: nothing to fit it to
            fits.append(matrices[e][:, kept_in.to(weight.device)].double())
            choices.append(None)
    device = fits[0].device
    stacked = torch.stack([f.to(device) for f in fits])  # (experts, out, kept columns)
    if consumer.in_axis == 1:  # W (E, in, out)
        stacked = stacked.transpose(1, 2)
    return (stacked.index_select(consumer.out_axis, rows.to(device)).contiguous().to(weight.device, weight.dtype),
            choices)


REFIT_META = "fxprune_refit"


def attach_refit_report(result, report: dict) -> None:
    """Keep what the refits chose on the pruned model: ``gm.meta["fxprune_refit"]`` (a model pruned in place: its
    attribute ``fxprune_refit``), ``{"one-shot": {weight name: choice}, "sequential": {...}}`` with each
    choice a :meth:`~fxprune.calibration.ridge.Choice.as_dict` (strength, held-out errors before and after, tokens).

    Example::

        >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x,), importance="obs", calibration=batches,
        ...                        reconstruct=True)
        >>> pruned.meta["fxprune_refit"]["one-shot"]["fc2.weight"]
        {'strength': 0.01, 'held_out_error_before': 0.21, 'held_out_error_after': 0.04, 'tokens': 512,
         'held_out_tokens': 96, 'width': 24}
    """
    meta = getattr(result, "meta", None)
    if isinstance(meta, dict):
        meta[REFIT_META] = report
    else:
        object.__setattr__(result, REFIT_META, report)


def load_refit(pruned: torch.nn.Module, weights: dict) -> list[str]:
    """Copy refit tensors into the pruned model by parameter name (rewriting keeps names); returns the names."""
    target = dict(pruned.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in weights.items():
            if name not in target:
                raise ValueError(f"reconstruct: the pruned model has no parameter {name!r}")
            if tuple(value.shape) != tuple(target[name].shape):
                raise ValueError(f"reconstruct: refit {name} has shape {tuple(value.shape)}, the pruned model's "
                                 f"{tuple(target[name].shape)} (was it pruned with another plan?)")
            target[name].copy_(value)
    return list(weights)


def reconstruct(dg, removal: dict, pruned: torch.nn.Module, batches, damping: float | None = None,
                progress=None, report: dict | None = None) -> list[str]:
    """Refit, in ``pruned``, every calibrated consumer that lost input columns under ``removal``.

    ``dg`` is the analysed original (its weights are the targets); ``pruned`` the result of
    ``fxprune.apply(dg, removal)``. Returns the names of the refit parameters (weights and biases).
    """
    return load_refit(pruned, refit_consumers(dg, removal, batches, damping, progress, report))
