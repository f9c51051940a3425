"""Short knowledge distillation: train a pruned model in place to match the original on calibration batches.

The teacher (the original model) runs in eval mode under ``no_grad`` and is never changed; the student
(``fxprune.prune``'s GraphModule, or a Hugging Face model pruned with ``inplace=True``) is trained with
AdamW, in eval mode so that dropout is off and BatchNorm uses its running statistics, then left in eval
mode. The loss is a sum of three parts:

- outputs: KL divergence of the softmax at ``temperature`` for logits (a Hugging Face output's ``logits``, or
  every output with ``loss="kl"``), else the squared error divided by the teacher output's variance
  (``loss="mse"``, 1.0 for a student that outputs the teacher's mean);
- intermediate states (``hidden_states=True``): the residual stream at every layer boundary, each the squared
  error over the teacher state's variance, averaged over boundaries and weighted by ``hidden_weight``. For a
  Hugging Face student and teacher these are the model's ``hidden_states``; otherwise the boundaries are found
  from the graphs (:mod:`fxprune.calibration.boundaries`: every ``x + f(x)`` whose branch holds a layer with
  weights) of the student (a GraphModule, or a module ``symbolic_trace`` takes) and of the teacher (captured
  with the first batch when it is not a GraphModule), and paired in graph order. Where the student's width
  differs (the residual stream was pruned), a learned linear map (student width -> teacher width, initialised
  by least squares on the first batch, trained with the student) carries the student's state first;
- pooled embeddings (``pooled=True``; ``"auto"``: when the teacher returns hidden states, not logits, as an
  embedding model does): ``1 - cos`` between the student's and the teacher's first output mean-pooled over
  the unpadded positions.

Padding positions (``attention_mask == 0``) are left out of all three. Parameters that do not require grad are
not trained; a large vocabulary table the pruning kept whole is worth freezing so (only a batch's rows get a
gradient, but AdamW updates all of them each step: on all-MiniLM-L6-v2, 1.25x the steps per CPU second without it),
and text batched by length pads less (:func:`fxprune.calibration.batches.text_batches` with ``by_length=True``:
1.7x more on general English). The learning rate warms up linearly
over the first ``warmup`` of the run and then follows a cosine down to ``min_lr`` times ``lr``; the run's
progress is the largest of steps done / ``steps``, wall seconds / ``time_budget`` and process CPU seconds /
``cpu_budget`` (CPU time is what a shared machine's load does not inflate), so a budget in CPU seconds
gets the whole schedule. Batches cycle until the first of the three is reached.

``cache_teacher=True`` runs the teacher once per batch and keeps what the loss compares (its output tensors and
the matched intermediate states) for the later passes over the batches, so that a step after the first pass costs
only the student's forward and backward. It pays when the run goes over the batches more than once, and it holds
the teacher's states of every batch in memory (about ``(matched states + 1) x batch x sequence x width`` values
per batch; ``cache_dtype=torch.bfloat16`` halves that). The teacher is frozen and in eval mode, so its outputs
for a batch do not change between passes: the loss is the same as without the cache (up to ``cache_dtype``).

``autocast=torch.bfloat16`` (or ``torch.float16``) runs the student's forward under ``torch.autocast`` on its device:
mixed precision, so its matmuls compute in the lower precision while its parameters, their gradients and AdamW's
state stay float32; the losses are computed in float32 and the teacher runs as it is. On a CPU with bfloat16
instructions (AVX512-BF16, AMX) that buys steps per CPU second; on all-MiniLM-L6-v2 pruned 30% (one thread of an
AMD EPYC with AVX512-BF16, teacher cached) a step of 16 sentences took 0.20 CPU s against 0.25 in float32, one of
64 0.48 against 0.72. On a CPU without them it can be slower: measure before using it. Under autocast on the CPU,
attention runs by its math backend (the flash kernel's bfloat16 backward is the slow part there, see
``_autocast``).

Example::

    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="activation",
    ...                        calibration=batches, reconstruct=True)
    >>> result = fxprune.distill(pruned, model, batches, steps=200, lr=1e-4)
    >>> result.steps, result.last_loss < result.first_loss
    (200, True)
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from fxprune.analysis.capture import capture, is_hf_model, split_inputs
from fxprune.calibration.boundaries import residual_boundaries
from fxprune.calibration.statistics import placeholder_values

LOSSES = ("auto", "kl", "mse")
SCHEDULES = ("cosine", "constant")
AUTOCAST = (torch.bfloat16, torch.float16)


@dataclass
class DistillResult:
    """What :func:`distill` did: optimizer steps, seconds (wall and process CPU), the loss it used and the
    training loss per step; ``hidden_states``: intermediate states matched per batch (0: outputs only),
    ``mapped`` of them through a learned map (widths differ); ``pooled``: whether the pooled-embedding cosine
    loss was on."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    loss: str  # "kl" or "mse": what "auto" picked
    losses: list[float] = field(default_factory=list)
    hidden_states: int = 0  # hidden states matched per batch (0: outputs only)
    cpu_seconds: float = 0.0
    mapped: int = 0
    pooled: bool = False


def distill(student: torch.nn.Module, teacher: torch.nn.Module, batches, *, steps: int | None = None,
            time_budget: float | None = None, cpu_budget: float | None = None, lr: float = 1e-4,
            loss: str = "auto", temperature: float = 1.0, hidden_states: bool = True, hidden_weight: float = 1.0,
            pooled="auto", warmup: float = 0.05, schedule: str = "cosine", min_lr: float = 0.1, progress=None,
            optimizer=None, cache_teacher: bool = False, cache_dtype: torch.dtype | None = None,
            autocast: torch.dtype | None = None) -> DistillResult:
    """Train ``student`` in place to match the frozen ``teacher`` on ``batches``; returns a :class:`DistillResult`.

    ``batches``: calibration batches of model inputs (each a tensor, a tuple of positional inputs or a dict of
    keyword inputs such as a tokenizer's output), cycled over. ``steps``, ``time_budget`` (wall seconds) and
    ``cpu_budget`` (seconds of this process's CPU time, all threads) say when to stop (the first reached; at
    least one step is always taken) and set the schedule's length. ``loss``: ``"kl"`` (KL at
    ``temperature``, scaled by ``temperature**2``), ``"mse"`` (squared error over the teacher's variance) or
    ``"auto"`` (KL on a Hugging Face output's ``logits``, else MSE). ``hidden_states``, ``hidden_weight``,
    ``pooled``: the intermediate-state and pooled-embedding losses (see the module). ``warmup`` (a fraction of
    the run), ``schedule`` (``"cosine"`` or ``"constant"``) and ``min_lr`` (the cosine's end, a fraction of
    ``lr``) shape the learning rate. ``optimizer``: a ready optimizer over the student's parameters (default
    ``AdamW(lr=lr, weight_decay=0)`` over those that require grad; the schedule scales its groups' ``lr``).
    ``progress``: ``True``/``False`` forces the tqdm bar on or off; ``None`` shows it on a terminal.
    ``cache_teacher``: keep the teacher's outputs and matched states of each batch after its first pass (see the
    module; memory grows with the number of batches; a warning once it passes a quarter of the machine's memory),
    stored as ``cache_dtype`` (default: as computed).
    ``autocast``: ``torch.bfloat16`` or ``torch.float16`` runs the student's forward in mixed precision (see the
    module), None (default) as it is.

    Example::

        >>> result = fxprune.distill(pruned, model, [x[i:i + 32] for i in range(0, 512, 32)], cpu_budget=300)
        >>> print(f"{result.steps} steps, loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
        >>> fxprune.distill(pruned, model, batches, cpu_budget=300, cache_teacher=True, autocast=torch.bfloat16)
    """
    batches = _check(student, teacher, batches, steps, time_budget, loss, temperature, cpu_budget)
    if schedule not in SCHEDULES:
        raise ValueError(f"distill: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
        raise ValueError(f"distill: cache_dtype must be a floating-point torch.dtype, got {cache_dtype!r}")
    if autocast is not None and autocast not in AUTOCAST:
        raise ValueError(f"distill: autocast must be one of {', '.join(map(str, AUTOCAST))} or None, got {autocast!r}")
    if not 0 <= warmup < 1 or not 0 <= min_lr <= 1:
        raise ValueError(f"distill: warmup must be in [0, 1) and min_lr in [0, 1], got {warmup!r} and {min_lr!r}")
    _untie_from(student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is not None and _shared(teacher, [p for g in optimizer.param_groups for p in g["params"]]):
        raise ValueError("distill: the optimizer holds parameters of the teacher (ones the student shared with it "
                         "are copied first); build the optimizer over student.parameters() after distill's copy, "
                         "or leave optimizer=None")
    if optimizer is None and not params:
        raise ValueError("distill: no parameter of the student requires grad")
    was_training = teacher.training
    teacher.eval()
    student.eval()  # dropout off, BatchNorm on its running statistics: deterministic steps
    try:
        matcher = _Matcher(student, teacher, batches[0], hidden_states, pooled, loss, temperature, hidden_weight,
                           warn=True)
        if cache_teacher:
            matcher.cache, matcher.cache_dtype = {}, cache_dtype
        matcher.autocast = autocast
        optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: only fit
        maps = [p for m in matcher.maps.values() for p in m.parameters()]
        if maps:  # the learned maps train with the student, at the same learning rate
            optimizer.add_param_group({"params": maps, "lr": optimizer.param_groups[0]["lr"], "weight_decay": 0.0})
        base = [g["lr"] for g in optimizer.param_groups]
        losses: list[float] = []
        start, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(total=steps, desc="fxprune distill", disable=None if progress is None else not progress)

        def done() -> float:
            parts = [len(losses) / steps if steps else 0.0]
            if time_budget:
                parts.append((time.perf_counter() - start) / time_budget)
            if cpu_budget:
                parts.append((time.process_time() - cpu_start) / cpu_budget)
            return max(parts)

        try:
            with torch.enable_grad():
                for step, batch in enumerate(itertools.cycle(batches)):
                    scale = _schedule(done(), warmup, schedule, min_lr)
                    for group, lr0 in zip(optimizer.param_groups, base):
                        group["lr"] = lr0 * scale
                    value = matcher.loss(batch, key=step % len(batches))
                    if not torch.isfinite(value):
                        raise ValueError(f"distill: the loss is {value.item()} at step {step + 1} "
                                         f"(lr={lr:g} too high, or the student diverged)")
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    losses.append(value.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                    if done() >= 1.0:
                        break
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            for group, lr0 in zip(optimizer.param_groups, base):
                group["lr"] = lr0
            if maps:
                optimizer.param_groups.pop()
    finally:
        student.eval()
        teacher.train(was_training)
    return DistillResult(len(losses), time.perf_counter() - start, losses[0], losses[-1], matcher.kind, losses,
                         matcher.matched, time.process_time() - cpu_start, len(matcher.maps), matcher.pooled)


def _schedule(progress: float, warmup: float, schedule: str, min_lr: float) -> float:
    """The learning-rate factor at ``progress`` (0 to 1) of the run: linear warm-up, then cosine (or constant).

    Example::

        >>> [round(_schedule(p, 0.1, "cosine", 0.1), 3) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
        [0.1, 0.55, 1.0, 0.55, 0.1]
    """
    if warmup and progress < warmup:
        return min_lr + (1 - min_lr) * progress / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (progress - warmup) / max(1 - warmup, 1e-12))
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


class _Tap(fx.Interpreter):
    """Runs a graph and keeps the values of some nodes."""

    def __init__(self, gm: fx.GraphModule, nodes):
        super().__init__(gm)
        self.nodes, self.found = set(nodes), {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.nodes:
            self.found[n] = value
        return value


class _Side:
    """How one model (student or teacher) runs: ``(outputs, intermediate states)`` of a batch."""

    def __init__(self, model, graph: fx.GraphModule | None, nodes: list, hf_hidden: bool):
        self.model, self.graph, self.nodes, self.hf_hidden = model, graph, nodes, hf_hidden

    def run(self, batch) -> tuple:
        if self.graph is None or not self.nodes:
            out = _call(self.model, batch, self.hf_hidden)
            states = list(getattr(out, "hidden_states", None) or []) if self.hf_hidden else []
            return out, states
        batch = _to_device(self.graph, batch)
        tap = _Tap(self.graph, self.nodes)
        out = tap.run(*placeholder_values(self.graph, batch), enable_io_processing=False)
        return self.graph.graph.process_outputs(out), [tap.found[n] for n in self.nodes]


class _Matcher:
    """The distillation loss of one student against one teacher: which states are paired, their maps."""

    def __init__(self, student, teacher, first_batch, hidden: bool, pooled, loss: str, temperature: float,
                 hidden_weight: float, warn: bool):
        self.loss_name, self.temperature, self.hidden_weight = loss, temperature, hidden_weight
        self.kind, self.maps = None, {}
        self.student, self.teacher = self._sides(student, teacher, first_batch, hidden, warn)
        self.matched = 0
        with torch.no_grad():
            t_out, t_states = self.teacher.run(first_batch)
            s_out, s_states = self.student.run(first_batch)
        self.pairs = self._pair(s_states, t_states, first_batch, warn)
        self.matched = len(self.pairs)
        self.pooled = _embedding_output(t_out) is not None if pooled == "auto" else bool(pooled)
        if self.pooled and _embedding_output(t_out) is None:
            raise ValueError("distill: pooled=True needs a teacher whose first output is a (batch, sequence, "
                             "features) hidden state")

    def _sides(self, student, teacher, batch, hidden: bool, warn: bool) -> tuple[_Side, _Side]:
        if not hidden:
            return _Side(student, None, [], False), _Side(teacher, None, [], False)
        if is_hf_model(student) and is_hf_model(teacher):
            return _Side(student, None, [], True), _Side(teacher, None, [], True)
        s_graph = student if isinstance(student, fx.GraphModule) else _traced(student)
        t_graph = teacher if isinstance(teacher, fx.GraphModule) else None
        s_nodes = residual_boundaries(s_graph) if s_graph is not None else []
        if s_nodes and t_graph is None:
            t_graph = _captured(teacher, batch)
        t_nodes = residual_boundaries(t_graph) if t_graph is not None else []
        if len(s_nodes) != len(t_nodes) or s_graph is None or t_graph is None:
            if warn and (s_nodes or t_nodes or s_graph is None):
                why = (f"the student's graph has {len(s_nodes)} residual boundaries and the teacher's {len(t_nodes)}"
                       if s_graph is not None and t_graph is not None else
                       "the student could not be traced into a graph" if s_graph is None else
                       "the teacher could not be captured into a graph")
                warnings.warn(f"fxprune.distill: intermediate states are not matched ({why}); matching the outputs "
                              "only", stacklevel=4)
            return _Side(student, None, [], False), _Side(teacher, None, [], False)
        return _Side(student, s_graph, s_nodes, False), _Side(teacher, t_graph, t_nodes, False)

    def _pair(self, ours: list, theirs: list, batch, warn: bool) -> list:
        """The indices of the states to match: equal shapes, or shapes differing in one (width) axis, matched
        through a learned map along that axis, initialised here by least squares on ``batch``."""
        if not ours or not theirs or len(ours) != len(theirs):
            if warn and (ours or theirs):
                warnings.warn(f"fxprune.distill: the student has {len(ours)} hidden states and the teacher "
                              f"{len(theirs)}; none are matched", stacklevel=4)
            return []
        pairs, skipped = [], 0
        mask = _mask(batch)
        for i, (s, t) in enumerate(zip(ours, theirs)):
            differ = [d for d in range(t.dim()) if s.shape[d] != t.shape[d]] if (
                isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.dim() == t.dim()) else None
            if differ == []:
                pairs.append(i)
            elif differ is not None and len(differ) == 1:
                self.maps[i] = _WidthMap(s.detach(), t.detach(), differ[0], mask)
                pairs.append(i)
            else:
                skipped += 1
        if skipped and warn:
            warnings.warn(f"fxprune.distill: {skipped} of {len(ours)} hidden states differ in more than one axis "
                          "between student and teacher; those are not matched", stacklevel=4)
        return pairs

    cache: dict | None = None  # batch key -> the teacher's (outputs, states), with cache_teacher=True
    cache_dtype: torch.dtype | None = None
    cache_bytes: int = 0  # what the cache holds so far; past cache_warning_bytes() it warns once
    autocast: torch.dtype | None = None  # the student's forward under torch.autocast at this dtype

    def loss(self, batch, key=None) -> torch.Tensor:
        if self.cache is not None and key in self.cache:
            t_out, t_states = self.cache[key]
        else:
            with torch.no_grad():
                t_out, t_states = self.teacher.run(batch)
            if self.cache is not None and key is not None:
                t_out, t_states = self._kept(t_out, t_states)
                self.cache[key] = (t_out, t_states)
                self._count_cached(t_out, t_states)
        with _autocast(self.student.model, self.autocast):  # the losses below are computed in float32
            s_out, s_states = self.student.run(batch)
            s_states = [self.maps[i](s) if i in self.maps else s for i, s in enumerate(s_states)]
        mask = _mask(batch)
        total, self.kind = _output_loss(s_out, t_out, mask, self.loss_name, self.temperature)
        if self.pairs:
            hidden = [_mse(s_states[i], t_states[i], mask) for i in self.pairs]
            total = total + self.hidden_weight * sum(hidden) / len(hidden)
        if self.pooled:
            total = total + _pooled_cosine(_embedding_output(s_out), _embedding_output(t_out), mask)
        return total

    def _count_cached(self, out, states: list) -> None:
        """Add one batch's cached tensors to ``cache_bytes``; the first time the total passes
        :func:`cache_warning_bytes`, warn with the size, the batches cached so far and what to do about it (the
        cache has no cap: a run over many batches could otherwise fill the machine's memory without a word)."""
        before = self.cache_bytes
        self.cache_bytes += sum(x.numel() * x.element_size() for x in tree_flatten((out, states))[0]
                                if isinstance(x, torch.Tensor))
        limit = cache_warning_bytes()
        if before <= limit < self.cache_bytes:
            warnings.warn(f"fxprune.distill: cache_teacher holds {self.cache_bytes / 2**30:.1f} GiB of the teacher's "
                          f"outputs after {len(self.cache)} batches, more than {limit / 2**30:.1f} GiB (a quarter of "
                          "the machine's physical memory), and grows with every new batch; pass "
                          "cache_dtype=torch.bfloat16 (half the size), fewer batches, or cache_teacher=False",
                          stacklevel=5)

    def _kept(self, out, states: list) -> tuple:
        """What the loss reads of the teacher's ``(outputs, states)``: a ``ModelOutput`` (a dict) reduced to its
        top-level tensors (its ``hidden_states`` tuple is the ``states``), the states that are matched (None for
        the others), each stored as ``cache_dtype``; the rest is dropped from the cache."""
        keep = (lambda x: x.to(self.cache_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                and self.cache_dtype is not None else x)
        if isinstance(out, dict):
            out = {k: keep(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
        else:
            out = tree_map(keep, out)
        matched = set(self.pairs)
        return out, [keep(s) if i in matched else None for i, s in enumerate(states)]


class _WidthMap(torch.nn.Module):
    """A learned linear map of a student state's width axis (``dim``) to the teacher's, initialised by ridge
    least squares on one batch's states (tokens, or positions of a feature map, as rows)."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, dim: int, mask=None):
        super().__init__()
        self.dim = dim
        a, b = s.movedim(dim, -1).double(), t.movedim(dim, -1).double()
        if mask is not None and dim == s.dim() - 1 and tuple(mask.shape) == tuple(t.shape[:-1]):
            keep = mask.to(t.device).reshape(-1) != 0
            a, b = a.reshape(-1, a.shape[-1])[keep], b.reshape(-1, b.shape[-1])[keep]
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        gram = a.T @ a
        gram += 1e-3 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype,
                                                                             device=gram.device)
        fit = torch.linalg.solve(gram, a.T @ b).T  # (teacher width, student width)
        self.linear = torch.nn.Linear(s.shape[dim], t.shape[dim], bias=False).to(s.device)
        with torch.no_grad():
            self.linear.weight.copy_(fit.to(self.linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)


def cache_warning_bytes() -> int:
    """How much ``cache_teacher`` may hold before :func:`distill` warns: a quarter of the machine's physical memory
    (``os.sysconf``; 4 GiB where the platform does not report it).

    Example::

        >>> cache_warning_bytes() > 0
        True
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 4 * 2**30


def _autocast(model, dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``model``'s device at ``dtype`` (a no-op context for None); on the CPU, attention
    (``scaled_dot_product_attention``) by its math backend: the CPU flash-attention kernel's backward in bfloat16
    is several times slower than in float32 (torch 2.14, MiniLM's shapes: 11.2 ms against 1.8 ms forward and
    backward; the math backend's bfloat16 matmuls: 2.7 ms).

    Example::

        >>> with _autocast(torch.nn.Linear(4, 4), torch.bfloat16):
        ...     torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype
        torch.bfloat16
    """
    if dtype is None:
        return contextlib.nullcontext()
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def _traced(model) -> fx.GraphModule | None:
    """A symbolic trace of ``model`` over its own modules (training it trains ``model``), or None."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable student is matched on its outputs, with a warning
        return None


def _captured(teacher, batch) -> fx.GraphModule | None:
    """The teacher captured as fxprune captures models (export for Hugging Face), from one batch; None if that
    fails."""
    args, kwargs = split_inputs(batch if isinstance(batch, (dict, torch.Tensor)) else tuple(batch))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = capture(teacher, tuple(args), dict(kwargs or {}))
    except Exception:  # noqa: BLE001
        return None
    from fxprune.analysis.propagate import propagate

    try:
        propagate(gm, tuple(args), dict(kwargs or {}))  # shapes for residual_boundaries
    except Exception:  # noqa: BLE001 - boundaries are then found without shapes
        pass
    return gm


def _to_device(gm, batch):
    device = next(itertools.chain(gm.parameters(), gm.buffers()), torch.empty(0)).device
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def _embedding_output(out) -> torch.Tensor | None:
    """The first output when it is a (batch, sequence, features) hidden state and there are no logits."""
    if getattr(out, "logits", None) is not None or (isinstance(out, dict) and "logits" in out):
        return None
    first = next(iter(_outputs(out).values()), None)
    return first if isinstance(first, torch.Tensor) and first.dim() == 3 else None


def _pooled_cosine(s: torch.Tensor, t: torch.Tensor, mask) -> torch.Tensor:
    """``1 - cos`` of the mean over unpadded positions, averaged over the batch."""
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        weight = mask.to(t.device, torch.float32)[..., None]
    else:
        weight = torch.ones(*t.shape[:2], 1, device=t.device)
    pool = lambda x: (x.float() * weight).sum(1) / weight.sum(1).clamp_min(1e-9)  # noqa: E731
    return (1 - F.cosine_similarity(pool(s), pool(t), dim=-1)).mean()


def _check(student, teacher, batches, steps, time_budget, loss, temperature, cpu_budget=None) -> list:
    if steps is None and time_budget is None and cpu_budget is None:
        raise ValueError("distill needs steps (optimizer steps) or time_budget / cpu_budget (seconds), or several")
    if cpu_budget is not None and not (isinstance(cpu_budget, (int, float)) and cpu_budget > 0):
        raise ValueError(f"distill: cpu_budget must be a positive number of seconds, got {cpu_budget!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"distill: steps must be a positive int, got {steps!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"distill: time_budget must be a positive number of seconds, got {time_budget!r}")
    if loss not in LOSSES:
        raise ValueError(f"distill: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"distill: temperature must be positive, got {temperature!r}")
    if student is teacher:
        raise ValueError("distill: the student is the teacher; prune a copy (inplace=False) or keep the original")
    if batches is None:
        raise ValueError("distill needs calibration batches of model inputs")
    batches = [batches] if isinstance(batches, (torch.Tensor, dict)) else list(batches)
    if not batches:
        raise ValueError("distill: calibration data is empty: pass at least one batch")
    return batches


def _untie_from(student, teacher) -> None:
    """Give the student its own copy of any parameter it shares with the teacher, keeping its own ties
    (a tied ``lm_head``): training must not change the teacher through shared storage."""
    theirs = {t.data_ptr() for t in itertools.chain(teacher.parameters(), teacher.buffers()) if t.numel()}
    modules = {id(m) for m in teacher.modules()}
    copies: dict[int, torch.nn.Parameter] = {}
    for path, module in student.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.numel() and p.data_ptr() in theirs:
                if id(module) in modules:  # a copy set on a shared module would be the teacher's parameter
                    raise ValueError(f"distill: the student's module {path or type(module).__name__!r} is one of "
                                     "the teacher's modules, so training would change the teacher; distill "
                                     "against a copy (copy.deepcopy(teacher) before pruning in place)")
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = copies[id(p)]


def _shared(teacher, tensors) -> bool:
    theirs = {t.data_ptr() for t in itertools.chain(teacher.parameters(), teacher.buffers()) if t.numel()}
    return any(t.numel() and t.data_ptr() in theirs for t in tensors)


def _call(model, batch, hidden: bool):
    """Run ``model`` on one batch (moved to the model's device); Hugging Face models without a cache."""
    args, kwargs = split_inputs(batch if isinstance(batch, (dict, torch.Tensor)) else tuple(batch))
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    args, kwargs = tree_map(move, tuple(args)), tree_map(move, dict(kwargs or {}))
    if is_hf_model(model):
        accepted = inspect.signature(model.forward).parameters
        takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        if "use_cache" in accepted or (takes_more and getattr(model.config, "use_cache", None) is not None):
            kwargs.setdefault("use_cache", False)  # no key/value cache to build while training
        if hidden:  # every Hugging Face model takes it (explicitly, or through **kwargs in transformers 5)
            kwargs["output_hidden_states"] = True
    return model(*args, **kwargs)


def _output_loss(out, target, mask, loss: str, temperature: float) -> tuple:
    """``(loss tensor, "kl" | "mse")`` of the student's outputs against the teacher's."""
    logits = getattr(target, "logits", None)
    if logits is None and isinstance(target, dict):
        logits = target.get("logits")
    if isinstance(logits, torch.Tensor):
        pairs = [(_field(out, "logits"), logits)]
        kind = "mse" if loss == "mse" else "kl"
    else:
        got, expected = _outputs(out), _outputs(target)
        names = [k for k in expected if k in got]
        if not names or any(got[k].shape != expected[k].shape for k in names):
            raise ValueError(f"distill: the student's outputs {_shapes(got)} do not match the teacher's "
                             f"{_shapes(expected)} (was the output width pruned?)")
        pairs = [(got[k], expected[k]) for k in names]
        kind = "kl" if loss == "kl" else "mse"
    total = sum(_kl(s, t, temperature, mask) if kind == "kl" else _mse(s, t, mask) for s, t in pairs) / len(pairs)
    return total, kind


def _field(out, name: str) -> torch.Tensor:
    value = getattr(out, name, None)
    if value is None and isinstance(out, dict):
        value = out.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"distill: the teacher returns {name} but the student ({type(out).__name__}) does not")
    return value


def _outputs(out) -> dict:
    """The floating-point output tensors by name: a dict's (a ``ModelOutput``'s) top-level tensors, so that a
    cache or hidden states one side returns do not shift the pairing; else the output's leaves by position."""
    if isinstance(out, dict):
        items = out.items()
    else:
        items = enumerate(tree_flatten(out)[0])
    return {k: v for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _shapes(outputs: dict) -> dict:
    return {k: tuple(v.shape) for k, v in outputs.items()}


def _mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _rows(s, t, mask):
    """Both tensors as ``(rows, features)``, padding rows dropped when the mask fits their leading dims."""
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:-1]):
        keep = mask.to(t.device).reshape(-1).bool()
        return s.reshape(-1, s.shape[-1])[keep], t.reshape(-1, t.shape[-1])[keep]
    width = t.shape[-1] if t.dim() else 1
    return s.reshape(-1, width), t.reshape(-1, width)


def _kl(s, t, temperature, mask):
    s, t = _rows(s.float(), t.float(), mask)
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def _mse(s, t, mask):
    s, t = _rows(s.float(), t.float(), mask)
    var = t.var(unbiased=False) if t.numel() > 1 else t.new_tensor(1.0)
    return F.mse_loss(s, t) / var.clamp_min(1e-8)


# the loss a caller may want on held-out batches, without training (no grad)
def distill_loss(student, teacher, batches, *, loss: str = "auto", temperature: float = 1.0,
                 hidden_states: bool = False, hidden_weight: float = 1.0, pooled=False) -> float:
    """Mean :func:`distill` loss of ``student`` against ``teacher`` over ``batches`` (no training, no grad). With
    ``hidden_states=True`` the intermediate states of equal shapes are matched too (states of other widths, which
    :func:`distill` maps with maps it learns, are left out here).

    Example::

        >>> before = distill_loss(pruned, model, held_out)
        >>> fxprune.distill(pruned, model, batches, steps=100)
        >>> distill_loss(pruned, model, held_out) < before
        True
    """
    batches = _check(student, teacher, batches, 1, None, loss, temperature)
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    try:
        with torch.no_grad():
            matcher = _Matcher(student, teacher, batches[0], hidden_states, pooled, loss, temperature, hidden_weight,
                               warn=False)
            matcher.pairs = [i for i in matcher.pairs if i not in matcher.maps]
            values = [matcher.loss(b).item() for b in batches]
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    return math.fsum(values) / len(values)
