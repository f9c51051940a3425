"""Input statistics of every calibrated consumer (Linear, weight matmul/addmm, 1-3-d and grouped
convolutions), streamed over calibration batches.

The batches run through ``dg.gm`` (the analysed graph, real weights) in an fx Interpreter that, before
each consumer call, adds the call's input as ``(tokens, in_features)`` (a convolution's patches,
see :mod:`fxprune.calibration.consumers`) into float64 sums on
the input's device: ``sum x``, ``sum x^2`` and, with ``gram=True``, ``sum x~ x~^T`` for ``x~ = [x, 1]``
(the constant column for the bias), and the same Gram sum over the held-out tokens only (``held_sum``), on
which reconstruction chooses each refit's ridge strength (:mod:`fxprune.calibration.ridge`). Held out: every
fifth sequence (image, sample) of a call's leading axis when it has at least five, else the last fifth of its
token rows (:func:`held_out_rows`); a mixture-of-experts weight's routed rows, every fifth row.

Padding does not count: when a batch is a dict with a 2-d ``attention_mask`` (a tokenizer's output), the rows
of a consumer input shaped ``(batch, sequence, features)`` at masked positions (``attention_mask == 0``) are
left out of every sum (:func:`token_rows`). Inputs of other shapes (a convolution's patches, the routed rows
of experts) are taken whole. A grouped convolution of g blocks keeps g Gram matrices, one per block
of features (``(g, d / g + 1, d / g + 1)``): an output block never reads another block's inputs, so the
cross-block products are never needed. A mixture-of-experts weight (``Consumer.experts``) keeps one
``InputStats`` per expert over the rows routed to that expert (:class:`ExpertStats`): expert e is refit and
scored on its own tokens. Activations are never stored. Buffers (BatchNorm running statistics
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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.analysis.capture import flat_inputs, split_inputs


@dataclass
class InputStats:
    """Float64 sums over every token that entered one consumer (all its calls)."""

    count: int
    total: torch.Tensor  # (d,) sum of x
    squares: torch.Tensor  # (d,) sum of x^2
    gram_sum: torch.Tensor | None = None  # (d + 1, d + 1) sum of [x, 1] [x, 1]^T, None without gram=True
    blocks: int = 1  # a grouped convolution's blocks: then gram_sum is (blocks, d / blocks + 1, d / blocks + 1)
    held_sum: torch.Tensor | None = None  # gram_sum over the held-out tokens only (a subset of count)
    held: int = 0  # held-out tokens

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
        """``E[x~ x~^T]`` with ``x~ = [x, 1]``: the last row and column hold the mean and 1 (per block of a
        grouped convolution: ``gram[b]`` is block b's)."""
        if self.gram_sum is None:
            raise ValueError("these statistics were collected without gram=True")
        return self.gram_sum / self.count

    def block_gram(self, b: int) -> torch.Tensor:
        """Block b's ``E[x~ x~^T]`` (the whole Gram matrix when there is one block)."""
        return self.gram if self.blocks == 1 else self.gram[b]

    def block_sums(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block b's Gram sums ``(all tokens, held-out tokens)`` (the whole ones when there is one block)."""
        if self.gram_sum is None:
            raise ValueError("these statistics were collected without gram=True")
        if self.blocks == 1:
            return self.gram_sum, self.held_sum
        return self.gram_sum[b], None if self.held_sum is None else self.held_sum[b]

    def features(self, index) -> InputStats:
        """The statistics of some features only (no Gram matrix): ``stats.features(slice(0, 4))``."""
        return InputStats(self.count, self.total[index], self.squares[index])

    @classmethod
    def empty(cls, d: int, device, gram: bool, blocks: int = 1) -> InputStats:
        """Zero sums for ``d`` features (in ``blocks`` blocks of ``d / blocks``)."""
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        size = d // blocks + 1
        shape = (size, size) if blocks == 1 else (blocks, size, size)
        return cls(0, zeros(d), zeros(d), zeros(shape) if gram else None, blocks, zeros(shape) if gram else None)

    def add(self, x: torch.Tensor, held: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (tokens, in_features); ``held``: which rows are held out (bool, (tokens,))."""
        x = x.detach().double()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += x.square().sum(0)
        if self.gram_sum is not None:
            _add_gram(self.gram_sum, x, self.blocks)
            if held is not None and self.held_sum is not None:
                rows = x[held.to(x.device)]
                self.held += rows.shape[0]
                _add_gram(self.held_sum, rows, self.blocks)


def _add_gram(target: torch.Tensor, x: torch.Tensor, blocks: int) -> None:
    """``target += sum [x, 1] [x, 1]^T`` (per block of features when ``blocks > 1``)."""
    if x.shape[0] == 0:
        return
    gram = target if blocks > 1 else target[None]
    xb = x.reshape(x.shape[0], blocks, -1).transpose(0, 1)  # (blocks, tokens, d / blocks)
    d = xb.shape[2]
    gram[:, :d, :d] += xb.transpose(1, 2) @ xb
    gram[:, :d, d] += xb.sum(1)
    gram[:, d, :d] += xb.sum(1)
    gram[:, d, d] += x.shape[0]


@dataclass
class ExpertStats:
    """The statistics of a mixture-of-experts weight: ``experts[e]`` over the rows routed to expert e (an expert
    no calibration token picked has ``count == 0``). Summed over experts, ``count`` is tokens x top-k.

    Example (4 experts, top-2, 14 tokens)::

        >>> [s.count for s in stats["model.layers.0.mlp.experts.down_proj"].experts]
        [9, 6, 5, 8]
    """

    experts: list

    @property
    def count(self) -> int:
        return sum(s.count for s in self.experts)

    @property
    def shares(self) -> list[float]:
        """Each expert's fraction of the routed rows (its weight when per-expert scores are combined)."""
        total = max(self.count, 1)
        return [s.count / total for s in self.experts]

    @classmethod
    def empty(cls, experts: int, d: int, device, gram: bool) -> ExpertStats:
        return cls([InputStats.empty(d, device, gram) for _ in range(experts)])

    def add(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Add the rows of ``x`` (rows, in_features), row r to expert ``ids[r]``; every fifth row is held out."""
        held = torch.arange(x.shape[0], device=x.device) % HOLD_OUT == HOLD_OUT - 1
        for e in ids.unique().tolist():
            self.experts[e].add(x[ids == e], held[ids == e])


HOLD_OUT = 5  # one sequence (or token row) in HOLD_OUT is held out to validate the refits


def held_out_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """Which of the ``rows`` feature rows of a consumer input ``value`` are held out (bool, (rows,)): whole
    sequences (images, samples: the leading axis) ``i % 5 == 4`` when there are at least five, else the last
    fifth of the rows.

    Example: a (10, 3, d) input's rows 12-14 and 27-29 (sequences 4 and 9) are held out::

        >>> held_out_rows(torch.zeros(10, 3, 8), 30).nonzero().flatten().tolist()
        [12, 13, 14, 27, 28, 29]
    """
    lead = value.shape[0] if value.dim() >= 2 else 1
    if lead >= HOLD_OUT and rows % lead == 0:
        index = torch.arange(lead, device=value.device) % HOLD_OUT == HOLD_OUT - 1
        return index.repeat_interleave(rows // lead)
    return torch.arange(rows, device=value.device) >= rows - rows // HOLD_OUT


def _lead(batch) -> int | None:
    """The batch's leading size (sequences, images): its first tensor's dim 0."""
    leaves = [t for t in tree_leaves(dict(batch) if isinstance(batch, Mapping) else batch)
              if isinstance(t, torch.Tensor) and t.dim() >= 1]
    return leaves[0].shape[0] if leaves else None


def held_out_batches(batches, limit: int = 64) -> list:
    """The held-out part of every batch of at least :data:`HOLD_OUT` sequences (sequences ``i % 5 == 4``, the ones
    the statistics hold out), every tensor with that leading size sliced, at most ``limit`` in all."""
    out, taken = [], 0
    for batch in batches or []:
        n = _lead(batch)
        if n is None or n < HOLD_OUT or taken >= limit:
            continue
        index = (torch.arange(n) % HOLD_OUT == HOLD_OUT - 1).nonzero().flatten()[:limit - taken]
        taken += len(index)

        def cut(v):
            return v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v

        if isinstance(batch, Mapping):
            out.append({k: cut(v) for k, v in batch.items()})
        elif isinstance(batch, torch.Tensor):
            out.append(cut(batch))
        else:
            out.append(type(batch)(cut(v) for v in batch))
    return out


def token_mask(batch) -> torch.Tensor | None:
    """A batch's 2-d ``attention_mask`` (a dict batch, a tokenizer's output), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def token_rows(consumer, value: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (rows, in_features), held-out flags (rows,))`` of one call's input ``value`` (not an expert
    weight's), the rows at padding positions left out: those where ``mask == 0`` when ``value`` is
    ``(*mask.shape, features)`` and the consumer reads it row by row (not a convolution's patches).

    Example: two sequences of 3 tokens, the second padded after one token::

        >>> x, held = token_rows(consumer, torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [1, 0, 0]]))
        >>> x.shape
        torch.Size([4, 8])
    """
    x = consumer.features(value)
    held = held_out_rows(value, x.shape[0])
    if mask is not None and consumer.patches is None and tuple(value.shape[:-1]) == tuple(mask.shape):
        keep = mask.reshape(-1).to(x.device) != 0
        x, held = x[keep], held[keep]
    return x, held


def record_input(stats: dict, consumer, value: torch.Tensor, gram: bool, route: tuple | None = None,
                 mask: torch.Tensor | None = None) -> None:
    """Add one call's input ``value`` (the tensor the call node reads) to ``stats[consumer.weight]`` (made on
    first use), leaving out padding positions of the batch's ``mask`` (see :func:`token_rows`). Shared by the
    whole-graph pass here and the layer-by-layer pass of :mod:`fxprune.io.checkpoint.layerwise`. An expert
    weight's call also needs ``route``: ``(kind, offsets or ids tensor)`` (see ``Consumer.expert_rows``).

    Example::

        >>> stats = {}
        >>> record_input(stats, consumer, torch.randn(2, 5, 8), gram=False)    # 10 tokens of 8 features
        >>> stats[consumer.weight].count
        10
    """
    weight = consumer.weight
    if consumer.experts:
        if route is None:
            raise ValueError(f"activation statistics: {weight} is a mixture-of-experts weight; its input needs the "
                             f"call's expert offsets or ids to be split by expert")
        x, ids = consumer.expert_rows(value, *route)
        if weight not in stats:
            stats[weight] = ExpertStats.empty(consumer.experts, x.shape[-1], x.device, gram)
        stats[weight].add(x, ids)
        return
    x, held = token_rows(consumer, value, mask)
    if weight not in stats:
        stats[weight] = InputStats.empty(x.shape[-1], x.device, gram, consumer.blocks)
    stats[weight].add(x, held)


class _Recorder(fx.Interpreter):
    """Runs the graph; before each consumer call, adds its input to the consumer's statistics."""

    def __init__(self, gm, watched: dict, stats: dict, gram: bool, mask: torch.Tensor | None = None):
        super().__init__(gm)
        self.watched, self.stats, self.gram = watched, stats, gram  # watched: {call node: (consumer, input node)}
        self.mask = mask  # the batch's attention mask: padding rows are left out
        # expert ids or offsets are read at the expert weight's call, which may come after the interpreter freed
        # them (batched_mm's ids feed the gather before the bmm): kept until the pass ends
        self.routes = {source: None for consumer, _ in watched.values() for _, source in consumer.routes.values()}

    def run_node(self, n: fx.Node):
        if n in self.watched:
            consumer, source = self.watched[n]
            route = None
            if consumer.experts:
                kind, node = consumer.routes[n]
                route = (kind, self.routes[node])
            record_input(self.stats, consumer, self.env[source], self.gram, route, self.mask)
        value = super().run_node(n)
        if n in self.routes:
            self.routes[n] = value
        return value


def placeholder_values(gm: fx.GraphModule, batch) -> tuple:
    """The graph's placeholder values for one batch (tensor, tuple of positional inputs, or dict of keywords).

    A dict batch (a tokenizer's output, also as its ``BatchEncoding``) feeds the inputs by name
    (:func:`dict_batch_inputs`), also those the model was captured with positionally: ``example_inputs=(input_ids,)``
    takes ``{"input_ids": ..., ...}``.
    """
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding (a UserDict)
        args, kwargs = dict_batch_inputs(gm, dict(batch))
    else:
        args, kwargs = split_inputs(batch if isinstance(batch, torch.Tensor) else tuple(batch))
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


_warned_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> ignored key sets said once


def dict_batch_inputs(gm: fx.GraphModule, batch: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the graph for a dict batch: the keys named like the inputs the model was captured with
    positionally feed them, in order; keys the graph takes as keywords feed those; other keys are left out, with
    one warning per graph naming them (and, for ``attention_mask``, what that means for padding).

    Example: a BERT analysed with ``example_inputs=(input_ids,)`` and calibrated on
    ``tokenizer(texts, padding=True, return_tensors="pt")`` runs on ``args = (batch["input_ids"],)``; it warns
    once that ``attention_mask`` and ``token_type_ids`` are left out. Analysed with ``example_inputs=()`` and
    ``kwargs=dict(tokenizer(text, return_tensors="pt"))`` it takes every key by name and warns of nothing.
    """
    names = [n.target.lstrip("*") for n in gm.graph.find_nodes(op="placeholder")]
    if gm.meta.get("fxprune_kwargs") is not None and isinstance(gm.graph._codegen, _PyTreeCodeGen):
        # exported: placeholders are the leaves of (args, kwargs); each tensor argument is one, named as in forward
        spec = gm.graph._codegen.pytree_info.in_spec
        positional = names[:(spec.child(0) if hasattr(spec, "child") else spec.children_specs[0]).num_leaves]
        keywords = set(gm.meta["fxprune_kwargs"])
    else:  # traced: every placeholder is a forward parameter, which a keyword fills by name
        positional, keywords = [], set(names)
    missing = [name for name in positional if name not in batch]
    if missing:
        raise ValueError(f"a calibration batch is a dict with keys {sorted(batch)}, but the model was captured with "
                         f"positional inputs {positional} and the batch has no {missing[0]!r}: pass batches of "
                         f"positional inputs (tuples), or analyse with the batch's keys (example_inputs=(), "
                         f"kwargs=one such dict) so that every key is an input by name")
    ignored = sorted(k for k in batch if k not in positional and k not in keywords)
    said = _warned_keys.setdefault(gm, set())
    if ignored and tuple(ignored) not in said:
        said.add(tuple(ignored))
        padding = (" Without attention_mask the model runs padded positions as ordinary tokens: a causal model's "
                   "real tokens before right padding are unaffected, a bidirectional model's attend to the padding."
                   if "attention_mask" in ignored else "")
        warnings.warn(f"fxprune: calibration batches have keys the analysed model does not take as inputs, left out: "
                      f"{', '.join(ignored)} (its inputs: {', '.join(names)}).{padding} To feed them, analyse with "
                      f"them: example_inputs=(), kwargs=one batch (a dict of its keys)", stacklevel=4)
    return tuple(batch[name] for name in positional), {k: v for k, v in batch.items() if k in keywords}


def _size_hint(dg, values) -> str | None:
    """Why a batch may have failed: its inputs' shapes differ from the example's, and the graph may hold the
    example's sizes (a Hugging Face model analysed for in-place pruning without calibration). None if they agree."""
    example = tuple(dg.example_inputs or ())
    for i, (value, seen) in enumerate(zip(values, example)):
        if isinstance(value, torch.Tensor) and isinstance(seen, torch.Tensor) and value.shape != seen.shape:
            return (f"a calibration batch failed in the captured graph; its input {i} has shape {tuple(value.shape)} "
                    f"where the example had {tuple(seen.shape)}: a graph captured with static sizes (a Hugging "
                    f"Face model analysed in place without calibration is) takes only the example's shapes")
    return None


def _warn_if_large(consumers, gram: bool, limit: float = 4 * 2 ** 30) -> None:
    """One warning when the float64 accumulators would take more than ``limit`` bytes."""
    # with gram=True: the Gram sums over all tokens and over the held-out ones
    size = sum(8 * max(c.experts, 1) * (2 * c.blocks * (c.in_features // c.blocks + 1) ** 2 if gram
                                        else 2 * c.in_features) for c in consumers)
    if size > limit:
        warnings.warn(f"fxprune: activation statistics of {len(consumers)} layers take {size / 2 ** 30:.1f} GiB "
                      f"of float64 accumulators{' (Gram matrices for reconstruct=True)' if gram else ''}",
                      stacklevel=3)


def collect_statistics(dg, batches, gram: bool = False, progress=None) -> dict[str, InputStats | ExpertStats]:
    """``{consumer weight name: InputStats}`` over ``batches`` (one pass, no activations kept); an expert weight's
    are ``ExpertStats``.

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
    count, held = 0, []  # held: the held-out sequences of the batches (for the refit's output check)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="fxprune activation statistics",
                              disable=None if progress is None else not progress):
                values = placeholder_values(gm, batch)
                try:
                    _Recorder(gm, watched, stats, gram, token_mask(batch)).run(*values, enable_io_processing=False)
                except Exception as exc:
                    hint = _size_hint(dg, values)
                    if hint is None:
                        raise
                    raise ValueError(f"{hint} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
                count += 1
                if gram and sum(_lead(b) or 0 for b in held) < HELD_SEQUENCES:
                    held += held_out_batches([batch], HELD_SEQUENCES - sum(_lead(b) or 0 for b in held))
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    if count == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    dg._fxprune_input_stats = (batches, gram, stats, held)
    return stats


HELD_SEQUENCES = 64  # held-out sequences kept by a statistics pass with gram=True (the refit's output check)


def held_out_calibration(dg, batches) -> list:
    """The held-out sequences (:func:`held_out_batches`, at most :data:`HELD_SEQUENCES`) that the last statistics
    pass with ``gram=True`` over ``batches`` kept, so that checking the refit takes no second pass over them; []
    if none ran."""
    cached = getattr(dg, "_fxprune_input_stats", None)
    return list(cached[3]) if cached is not None and cached[0] is batches and cached[1] else []
