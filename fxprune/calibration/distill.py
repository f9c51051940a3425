"""Short knowledge distillation: train a pruned model in place to match the original on calibration batches.

The teacher (the original model) runs in eval mode under ``no_grad`` and is never changed; the student
(``fxprune.prune``'s GraphModule, or a Hugging Face model pruned with ``inplace=True``) is trained with
AdamW, in eval mode so that dropout is off and BatchNorm uses its running statistics, then left in eval
mode. The loss compares the outputs: KL divergence of the softmax at ``temperature`` for logits (a Hugging
Face output's ``logits``, or every output with ``loss="kl"``), else the squared error divided by the
teacher output's variance (``loss="mse"``, 1.0 for a student that outputs the teacher's mean). With
``hidden_states=True`` and Hugging Face models, the hidden states whose shapes agree are matched the same
way (normalised squared error), averaged and added. Padding positions (``attention_mask == 0``) are
left out of both. Batches cycle until ``steps`` optimizer steps are done or ``time_budget`` seconds pass.

Example::

    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="activation",
    ...                        calibration=batches, reconstruct=True)
    >>> result = fxprune.distill(pruned, model, batches, steps=200, lr=1e-4)
    >>> result.steps, result.last_loss < result.first_loss
    (200, True)
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from fxprune.analysis.capture import is_hf_model, split_inputs

LOSSES = ("auto", "kl", "mse")


@dataclass
class DistillResult:
    """What :func:`distill` did: optimizer steps, seconds, the loss it used and the training loss per step."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    loss: str  # "kl" or "mse": what "auto" picked
    losses: list[float] = field(default_factory=list)
    hidden_states: int = 0  # hidden states matched per batch (0: outputs only)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, batches, *, steps: int | None = None,
            time_budget: float | None = None, lr: float = 1e-4, loss: str = "auto", temperature: float = 1.0,
            hidden_states: bool = True, progress=None, optimizer=None) -> DistillResult:
    """Train ``student`` in place to match the frozen ``teacher`` on ``batches``; returns a :class:`DistillResult`.

    ``batches``: calibration batches of model inputs (each a tensor, a tuple of positional inputs or a dict of
    keyword inputs such as a tokenizer's output), cycled over. ``steps`` and/or ``time_budget`` (seconds) say
    when to stop (whichever comes first; at least one step is always taken). ``loss``: ``"kl"`` (KL at
    ``temperature``, scaled by ``temperature**2``), ``"mse"`` (squared error over the teacher's variance) or
    ``"auto"`` (KL on a Hugging Face output's ``logits``, else MSE). ``optimizer``: a ready optimizer over the
    student's parameters (default ``AdamW(lr=lr, weight_decay=0)`` over those that require grad).
    ``progress``: ``True``/``False`` forces the tqdm bar on or off; ``None`` shows it on a terminal.

    Example::

        >>> result = fxprune.distill(pruned, model, [x[i:i + 32] for i in range(0, 512, 32)], time_budget=60)
        >>> print(f"{result.steps} steps, loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    """
    batches = _check(student, teacher, batches, steps, time_budget, loss, temperature)
    _untie_from(student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is not None and _shared(teacher, [p for g in optimizer.param_groups for p in g["params"]]):
        raise ValueError("distill: the optimizer holds parameters of the teacher (ones the student shared with it "
                         "are copied first); build the optimizer over student.parameters() after distill's copy, "
                         "or leave optimizer=None")
    if optimizer is None:
        if not params:
            raise ValueError("distill: no parameter of the student requires grad")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: a short run should only fit
    match_hidden = hidden_states and is_hf_model(teacher)
    if hidden_states and is_hf_model(teacher) and not is_hf_model(student):
        warnings.warn("fxprune.distill: hidden states are matched only when the student is a Hugging Face model "
                      "(a captured graph returns what it was captured with); matching the outputs only",
                      stacklevel=2)
        match_hidden = False
    was_training = teacher.training
    teacher.eval()
    student.eval()  # dropout off, BatchNorm on its running statistics: deterministic steps
    losses: list[float] = []
    chosen, matched, warned = None, 0, [False]
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="fxprune distill", disable=None if progress is None else not progress)
    try:
        with torch.enable_grad():
            for step, batch in enumerate(itertools.cycle(batches)):
                with torch.no_grad():
                    target = _call(teacher, batch, match_hidden)
                value, chosen, matched = _loss(_call(student, batch, match_hidden), target, batch, loss, temperature,
                                               warned)
                if not torch.isfinite(value):
                    raise ValueError(f"distill: the loss is {value.item()} at step {step + 1} "
                                     f"(lr={lr:g} too high, or the student diverged)")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                losses.append(value.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if (steps is not None and len(losses) >= steps) or (
                        time_budget is not None and time.perf_counter() - start >= time_budget):
                    break
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        student.eval()
        teacher.train(was_training)
    return DistillResult(len(losses), time.perf_counter() - start, losses[0], losses[-1], chosen, losses, matched)


def _check(student, teacher, batches, steps, time_budget, loss, temperature) -> list:
    if steps is None and time_budget is None:
        raise ValueError("distill needs steps (optimizer steps) or time_budget (seconds), or both")
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


def _loss(out, target, batch, loss: str, temperature: float, warned: list) -> tuple:
    """``(loss tensor, "kl" | "mse", hidden states matched)`` of the student's output against the teacher's."""
    logits = getattr(target, "logits", None)
    mask = _mask(batch)
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
    hidden = _hidden_pairs(out, target, warned)
    if hidden:
        total = total + sum(_mse(s, t, mask) for s, t in hidden) / len(hidden)
    return total, kind, len(hidden)


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


def _hidden_pairs(out, target, warned: list) -> list:
    """(student, teacher) hidden states of the same shape; one warning when some differ (a pruned hidden size)."""
    theirs = getattr(target, "hidden_states", None)
    ours = getattr(out, "hidden_states", None)
    if not theirs or not ours:
        return []
    if len(ours) != len(theirs):
        pairs = []
    else:
        pairs = [(s, t) for s, t in zip(ours, theirs) if s.shape == t.shape]
    if len(pairs) < len(theirs) and not warned[0]:
        warned[0] = True
        warnings.warn(f"fxprune.distill: {len(theirs) - len(pairs)} of {len(theirs)} hidden states differ in shape "
                      "between student and teacher (hidden size or layers pruned); those are not matched",
                      stacklevel=4)
    return pairs


# the loss a caller may want on held-out batches, without training (no grad)
def distill_loss(student, teacher, batches, *, loss: str = "auto", temperature: float = 1.0,
                 hidden_states: bool = False) -> float:
    """Mean :func:`distill` loss of ``student`` against ``teacher`` over ``batches`` (no training, no grad).

    Example::

        >>> before = distill_loss(pruned, model, held_out)
        >>> fxprune.distill(pruned, model, batches, steps=100)
        >>> distill_loss(pruned, model, held_out) < before
        True
    """
    batches = _check(student, teacher, batches, 1, None, loss, temperature)
    match_hidden = hidden_states and is_hf_model(teacher) and is_hf_model(student)
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    try:
        with torch.no_grad():
            values = [_loss(_call(student, b, match_hidden), _call(teacher, b, match_hidden), b, loss, temperature,
                            [True])[0].item() for b in batches]
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    return math.fsum(values) / len(values)
