"""Reconstruction: refit each calibrated consumer's kept columns and bias by ridge least squares.

After pruning, consumer ``y = W x + b`` sees only the kept input columns S (``W`` is the consumer's matrix,
see :mod:`fxprune.calibration.consumers`: ``W.T`` for ``x @ W`` and GPT-2's addmm, ``W.reshape(out, -1)``
over the patches for a convolution, where a kept channel keeps its ``prod(kernel)`` columns).
With ``G = E[x~ x~^T]`` the Gram matrix of ``x~ = [x, 1]`` over the calibration tokens (last index: the
constant) and ``S~ = S + {1}``, the weights that best predict the original output from what is left are::

    [W_S, b'] = ([W, b] G[:, S~] + lam [W, b][:, S~]) (G[S~, S~] + lam I)^-1,  lam = damping * mean(diag G[S~, S~])

so a removed column that is a linear combination of kept ones (plus a constant) is moved onto them
exactly (up to the damping), and a removed column's mean goes into the bias. A consumer without a bias
refits its kept columns only (no constant; no bias is added). Rows of an output axis that was pruned too
are refit and then sliced like the weight. A grouped convolution is solved block by block: output block b
from block b's kept columns and its own Gram matrix (a kept channel rank keeps its column in every
block). A mixture-of-experts weight (``Consumer.experts``) is solved expert by expert: expert e's kept
columns from the Gram of the tokens routed to it (an expert no calibration token picked keeps its columns as
they were); removed experts are dropped, not refit (their router rows are sliced: the router loses outputs,
not inputs). Depthwise convolutions are not calibrated (nothing to refit). Consumers whose weight is tied (one
tensor under several names) are left alone: refitting one use would change the other.

Every consumer is refit from the original model's inputs (one-shot, not layer by layer), so this is
exact for a consumer whose kept inputs are unchanged by the pruning (its producers were not refit).

Example::

    >>> dg = fxprune.analyze(model, (x,))
    >>> pruned = fxprune.apply(dg, removal)
    >>> reconstruct(dg, removal, pruned, batches)     # refit in place; returns the refit parameter names
    ['2.weight', '2.bias']
"""

from __future__ import annotations

from collections import Counter

import torch

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.statistics import collect_statistics
from fxprune.analysis.removal import kept_units
from fxprune.rewriting.rewrite import Sizes

DAMPING = 1e-4


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: torch.Tensor,
          damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The refit ``(W[:, kept]', b')`` of ``y = W x + b`` (float64) from the ``(d + 1)`` Gram of ``[x, 1]``."""
    d = weight.shape[1]
    w = weight.detach().double().to(gram.device)
    if bias is not None:
        w = torch.cat([w, bias.detach().double().to(gram.device)[:, None]], 1)
        cols = torch.cat([kept.to(gram.device), torch.tensor([d], device=gram.device)])
    else:
        gram, cols = gram[:d, :d], kept.to(gram.device)
    inner = gram[cols][:, cols]
    lam = damping * inner.diagonal().mean().clamp_min(1e-300)
    inner = inner + lam * torch.eye(len(cols), dtype=inner.dtype, device=inner.device)
    # [W, b] G[:, S~] inner^-1, solved as inner X^T = (W G[:, S~])^T (inner is symmetric)
    # the damping pulls towards the original weights, not towards 0: a kept column the calibration data never
    # excites (a ReLU unit dead on these batches) keeps its weights instead of losing them
    fitted = torch.linalg.solve(inner, (w @ gram[:, cols] + lam * w[:, cols]).T).T
    if bias is None:
        return fitted, None
    return fitted[:, :-1], fitted[:, -1]


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


def refit_consumers(dg, removal: dict, batches, damping: float = DAMPING, progress=None) -> dict:
    """``{parameter name: refit tensor}``, already sliced to the pruned shape, for every calibrated
    consumer that loses input columns under ``removal``. Reads only the original model (``dg.gm``), so it
    runs before rewriting (which may edit ``dg.gm`` in place)."""
    if batches is None:
        raise ValueError("reconstruct=True needs calibration batches: pass calibration=[batch, ...] "
                         "(a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs)")
    stats = collect_statistics(dg, batches, gram=True, progress=progress)
    original = dict(dg.gm.named_parameters(remove_duplicate=False))
    out = {}
    for name, consumer, kept_in, rows in losing_consumers(dg, removal):
        if name not in stats:
            continue
        weight = original[name]
        bias = original[consumer.bias] if consumer.bias else None
        if consumer.experts:
            out[name] = _refit_experts(dg, removal, consumer, weight, stats[name], kept_in, rows, damping)
            continue
        kernel = consumer.kernel  # kernel positions per input channel (1 for a Linear or matmul)
        columns = (kept_in[:, None] * kernel + torch.arange(kernel)).reshape(-1)
        biases = bias.chunk(consumer.blocks) if bias is not None else [None] * consumer.blocks
        fits = [refit(m, b, stats[name].block_gram(i), columns, damping)  # a block reads its own features only
                for i, (m, b) in enumerate(zip(consumer.matrices(weight), biases))]
        matrix = torch.cat([w for w, _ in fits])  # (out, kept columns)
        if consumer.in_axis == 0:  # x @ W: the weight is (in, out)
            w_new = matrix.T
        else:
            w_new = matrix.reshape(weight.shape[0], len(kept_in), *weight.shape[2:])
        out[name] = w_new.index_select(consumer.out_axis, rows.to(w_new.device)).contiguous().to(weight.device,
                                                                                               weight.dtype)
        if bias is not None:  # the bias's axis is the weight's output axis
            b_new = torch.cat([b for _, b in fits])
            out[consumer.bias] = b_new.index_select(0, rows.to(b_new.device)).to(bias.device, bias.dtype)
    return out


def _refit_experts(dg, removal, consumer, weight, stats, kept_in, rows, damping) -> torch.Tensor:
    """An expert weight refit expert by expert on each one's tokens, sliced to the kept experts, columns, rows."""
    experts = torch.as_tensor(Sizes(dg.solver, kept_units(dg, removal)).indices(dg.layout_of(consumer.weight, 0)))
    matrices, fits = consumer.matrices(weight.detach()), []
    for e in experts.tolist():
        s = stats.experts[e]
        if s.count:
            fits.append(refit(matrices[e], None, s.gram, kept_in, damping)[0])
        else:  # no calibration token reached this expert: nothing to fit it to
            fits.append(matrices[e][:, kept_in.to(weight.device)].double())
    device = fits[0].device
    stacked = torch.stack([f.to(device) for f in fits])  # (experts, out, kept columns)
    if consumer.in_axis == 1:  # W (E, in, out)
        stacked = stacked.transpose(1, 2)
    return stacked.index_select(consumer.out_axis, rows.to(device)).contiguous().to(weight.device, weight.dtype)


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


def reconstruct(dg, removal: dict, pruned: torch.nn.Module, batches, damping: float = DAMPING,
                progress=None) -> list[str]:
    """Refit, in ``pruned``, every calibrated consumer that lost input columns under ``removal``.

    ``dg`` is the analysed original (its weights are the targets); ``pruned`` the result of
    ``fxprune.apply(dg, removal)``. Returns the names of the refit parameters (weights and biases).
    """
    return load_refit(pruned, refit_consumers(dg, removal, batches, damping, progress))
