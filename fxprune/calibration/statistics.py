"""Input statistics of every calibrated consumer (Linear, convolution), streamed over calibration batches.

The batches run through ``dg.gm`` (the analysed graph, real weights) in an fx Interpreter that, before
each consumer call, adds the call's input as ``(tokens, in_features)`` (a convolution's unfolded patches,
see :mod:`fxprune.calibration.consumers`) into float64 sums on
the input's device: ``sum x``, ``sum x^2`` and, with ``gram=True``, ``sum x~ x~^T`` for ``x~ = [x, 1]``
(the constant column for the bias). Activations are never stored. Buffers (BatchNorm running statistics
of a model in training mode) are put back afterwards.

A batch is a tensor (the one positional input), a tuple or list of positional inputs, or a dict of
keyword inputs.

Example: two batches of 3 and 1 rows through ``Linear(2, 2) -> ReLU -> Linear(2, 1)``::

    >>> stats = collect_statistics(dg, [torch.randn(3, 2), torch.randn(1, 2)], gram=True)
    >>> s = stats["2.weight"]
    >>> s.count, s.mean.shape, s.var.shape, s.gram.shape
    (4, torch.Size([2]), torch.Size([2]), torch.Size([3, 3]))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.capture import flat_inputs, split_inputs


@dataclass
class InputStats:
    """Float64 sums over every token that entered one consumer (all its calls)."""

    count: int
    total: torch.Tensor  # (d,) sum of x
    squares: torch.Tensor  # (d,) sum of x^2
    gram_sum: torch.Tensor | None = None  # (d + 1, d + 1) sum of [x, 1] [x, 1]^T, None without gram=True

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance per input feature (clamped at 0 against rounding)."""
        return (self.squares / self.count - self.mean.square()).clamp_min(0)

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x_j^2]``: Wanda's ``||x_j||^2`` per token."""
        return self.squares / self.count

    @property
    def gram(self) -> torch.Tensor:
        """``E[x~ x~^T]`` with ``x~ = [x, 1]``: the last row and column hold the mean and 1."""
        if self.gram_sum is None:
            raise ValueError("these statistics were collected without gram=True")
        return self.gram_sum / self.count

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, in_features)."""
        x = x.detach().double()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += x.square().sum(0)
        if self.gram_sum is not None:
            d = x.shape[1]
            self.gram_sum[:d, :d] += x.T @ x
            self.gram_sum[:d, d] += x.sum(0)
            self.gram_sum[d, :d] += x.sum(0)
            self.gram_sum[d, d] += x.shape[0]


class _Recorder(fx.Interpreter):
    """Runs the graph; before each consumer call, adds its input to the consumer's statistics."""

    def __init__(self, gm, watched: dict, stats: dict, gram: bool):
        super().__init__(gm)
        self.watched, self.stats, self.gram = watched, stats, gram  # watched: {call node: (consumer, input node)}

    def run_node(self, n: fx.Node):
        if n in self.watched:
            consumer, source = self.watched[n]
            x, weight = consumer.features(self.env[source]), consumer.weight
            if weight not in self.stats:
                d, dev = x.shape[-1], x.device
                gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev) if self.gram else None
                self.stats[weight] = InputStats(0, torch.zeros(d, dtype=torch.float64, device=dev),
                                                torch.zeros(d, dtype=torch.float64, device=dev), gram)
            self.stats[weight].add(x)
        return super().run_node(n)


def placeholder_values(gm: fx.GraphModule, batch) -> tuple:
    """The graph's placeholder values for one batch (tensor, tuple of positional inputs, or dict of keywords)."""
    args, kwargs = split_inputs(batch if isinstance(batch, (dict, torch.Tensor)) else tuple(batch))
    exported = gm.meta.get("fxprune_kwargs")
    if exported is not None:  # an exported graph takes (args, kwargs) flattened, with the kwargs it was exported with
        kwargs = {k: (kwargs or {}).get(k, v) for k, v in exported.items()}
        values = tuple(tree_leaves((tuple(args), kwargs)))
    else:
        values = flat_inputs(gm, args, kwargs)
    expected = len(gm.graph.find_nodes(op="placeholder"))
    if len(values) != expected:
        raise ValueError(f"a calibration batch gives {len(values)} inputs where the model takes {expected}: "
                         f"activation statistics need batches of model inputs (a tensor, a tuple of positional "
                         f"inputs or a dict of keyword inputs), not (inputs, targets)")
    return values


def _warn_if_large(consumers, gram: bool, limit: float = 4 * 2 ** 30) -> None:
    """One warning when the float64 accumulators would take more than ``limit`` bytes."""
    size = sum(8 * ((n + 1) ** 2 if gram else 2 * n) for n in (c.in_features for c in consumers))
    if size > limit:
        warnings.warn(f"fxprune: activation statistics of {len(consumers)} layers take {size / 2 ** 30:.1f} GiB "
                      f"of float64 accumulators{' (Gram matrices for reconstruct=True)' if gram else ''}",
                      stacklevel=3)


def collect_statistics(dg, batches, gram: bool = False, progress=None) -> dict[str, InputStats]:
    """``{consumer weight name: InputStats}`` over ``batches`` (one pass, no activations kept).

    ``gram=True`` accumulates the ``(d + 1) x (d + 1)`` Gram matrix too (reconstruction needs it; criteria
    do not). ``progress``: ``True``/``False`` forces the tqdm bar on or off; ``None`` shows it on a terminal.
    The result is cached on ``dg`` for the same ``batches`` object, so a criterion and reconstruction share
    one pass (and a generator of batches is consumed once).
    """
    cached = getattr(dg, "_fxprune_input_stats", None)
    if cached is not None and cached[0] is batches and (cached[1] or not gram):
        return cached[2]
    if batches is None:
        raise ValueError("activation statistics need calibration batches: pass calibration=[batch, ...]")
    gm = dg.gm
    if any(p.device.type == "meta" for p in gm.parameters()):
        raise ValueError("activation statistics need real weights; the model is on the meta device")
    consumers = list(calibrated_consumers(dg).values())
    _warn_if_large(consumers, gram)
    watched = {node: (c, x) for c in consumers for node, x in c.calls}
    stats: dict[str, InputStats] = {}
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    count = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="fxprune activation statistics",
                              disable=None if progress is None else not progress):
                _Recorder(gm, watched, stats, gram).run(*placeholder_values(gm, batch), enable_io_processing=False)
                count += 1
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    if count == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    dg._fxprune_input_stats = (batches, gram, stats)
    return stats
