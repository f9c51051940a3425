"""The in-place check: the caller's own forward, run on the example inputs and on a second batch size, must
compute what the verified pruned graph computes; nothing about it is skipped in silence.

- :func:`graph_outputs`: the pruned graph on the model's inputs. A graph that cannot run on them is an error: the
  check would otherwise compare nothing.
- :func:`compare`: every tensor the model returns against the graph's, by position in the output tree (named by
  its path, ``[0]['logits']``): same number of tensors, same shapes, floating-point values within
  ``max(1e-3, sqrt(eps)) x`` their largest magnitude (the same aten ops on the same weights; a stale width moves
  outputs by about their own size), others exactly.
- :func:`doubled`: the second batch size is the example repeated along its first axis. The model's outputs
  there must equal the example's outputs repeated likewise (tried first: it costs no run of the graph) or the
  pruned graph's own there (a symbolically traced or dynamically exported graph takes the size; a batch that
  mixes its examples, or dropout in training mode, needs it). When they equal neither,
  the caller (:mod:`~fxprune.rewriting.inplace.mechanism`) asks whether the original model itself computes the
  example's outputs twice there; if it does not, the size does not apply to this model and a warning says so.
- :func:`explain`: what a failure message names: the innermost frames of the traceback in the model's own files,
  and integer attributes of the modules on them (or of any module whose tensors changed) still equal to an old
  width.

Training mode: both runs draw the same random numbers (dropout), and buffers a training forward updates
(BatchNorm's running statistics) get their values back after each run.

Example::

    >>> expected = graph_outputs(pruned, (x,), {})
    >>> compare(model(x), expected)               # [] when equal, else what differs
    ["output [0]: shape (1, 144) where the pruned graph gives (1, 96)"]
"""

from __future__ import annotations

import contextlib
import linecache
import os
import traceback

import torch
import torch.nn as nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map

from fxprune.errors import FxPruneError

SEED = 0  # both runs of a comparison draw the same random numbers (dropout in training mode)


def run(module, inputs, kwargs) -> object:
    """``module(*inputs, **kwargs)`` without gradients, with the same random numbers every time, buffers'
    values put back afterwards when it is in training mode."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]), _values_kept(module):
        torch.manual_seed(SEED)
        return module(*inputs, **kwargs)


@contextlib.contextmanager
def _values_kept(module):
    saved = []
    if isinstance(module, nn.Module) and module.training:
        saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def graph_outputs(pruned, inputs, kwargs) -> object:
    """The pruned graph's outputs on the model's inputs; an :class:`FxPruneError` if it cannot run on them."""
    try:
        return run(pruned, inputs, kwargs)
    except Exception as exc:
        raise FxPruneError(f"the in-place check cannot run: the pruned graph does not run on the model's own "
                           f"inputs ({type(exc).__name__}: {_first_line(exc)}), so the model pruned in place "
                           f"could not be compared with it") from exc


def compare(got, expected) -> list[str]:
    """What differs between the model's outputs and the pruned graph's (see module docstring); ``[]`` if
    nothing."""
    mine, theirs = _tensors(got), _tensors(expected)
    if len(mine) != len(theirs):
        return [f"the model returns {len(mine)} tensors ({', '.join(p or 'output' for p, _ in mine[:4])}) where "
                f"the pruned graph returns {len(theirs)} ({', '.join(p or 'output' for p, _ in theirs[:4])})"]
    problems = []
    for (path, a), (_, b) in zip(mine, theirs):
        where = f"output {path or '(the tensor)'}"
        if a.shape != b.shape:
            problems.append(f"{where}: shape {tuple(a.shape)} where the pruned graph gives {tuple(b.shape)}")
        elif b.is_floating_point():
            if not b.numel():
                continue
            scale = max(b.detach().abs().max().item(), 1.0)
            tolerance = max(1e-3, torch.finfo(b.dtype).eps ** 0.5) * scale
            error = (a.detach().float() - b.detach().float()).abs().max().item()
            if not error <= tolerance:  # NaN fails too
                problems.append(f"{where}: largest difference {error:.3g} (allowed {tolerance:.3g})")
        elif not torch.equal(a, b):
            problems.append(f"{where}: values differ")
    return problems


def _tensors(tree) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` of every tensor leaf (``[0]['logits']``; ``[i]`` by position where a registered output
    class has no keys: diffusers' outputs)."""
    try:
        leaves = [(keystr(p), t) for p, t in tree_flatten_with_path(tree)[0]]
    except ValueError:
        leaves = [(f"[{i}]", t) for i, t in enumerate(tree_leaves(tree))]
    return [(p, t) for p, t in leaves if isinstance(t, torch.Tensor)]


def doubled(tree):
    """Every tensor of at least one dimension repeated along its first axis (a batch of two copies)."""
    return tree_map(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim else t, tree)


def explain(exc: BaseException | None, model: nn.Module, changed: dict, widths: dict, unchanged=None) -> str:
    """What still carries an old width: the innermost frames of ``exc``'s traceback in the model's own files,
    and the integer attributes (of the modules on those frames; without an exception, of every module whose
    tensors changed) whose value is an old width (``widths``: old -> new sizes) and that nothing updated
    (``unchanged(module, attr, value)``) — as sentences."""
    parts = []
    names = {id(m): n for n, m in model.named_modules()}
    suspects: list[nn.Module] = []
    if exc is not None:
        frames = _model_frames(exc)
        if frames:
            lines = [f"{f}:{line}: {linecache.getline(f, line).strip()}" for f, line, _ in frames[-3:]]
            parts.append("it failed at " + " <- ".join(reversed(lines)))
            suspects = [s for _, _, s in reversed(frames) if isinstance(s, nn.Module) and id(s) in names]
    if not suspects:
        prefixes = {name.rpartition(".")[0] for name in changed}
        suspects = [m for n, m in model.named_modules() if n in prefixes or any(p.startswith(n + ".") for p in
                                                                                   prefixes if n)]
    stale = []
    for module in dict.fromkeys(suspects):
        path = names[id(module)]
        for attr, value in vars(module).items():
            if not attr.startswith("_") and type(value) is int and value in widths and value not in (0, 1) and \
                    (unchanged is None or unchanged(module, attr, value)):
                stale.append(f"{path + '.' if path else ''}{attr} = {value} (pruned to "
                             f"{' or '.join(map(str, sorted(widths[value])))} elsewhere)")
    if stale:
        parts.append("attributes still holding an old width: " + ", ".join(stale[:8])
                     + (f" and {len(stale) - 8} more" if len(stale) > 8 else ""))
    return "; ".join(parts)


def _model_frames(exc: BaseException) -> list[tuple]:
    """``(file, line, self)`` of the traceback's frames outside torch and fxprune, outermost first."""
    out = []
    for frame, line in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if line is None or _is_library(filename):
            continue
        out.append((filename, line, frame.f_locals.get("self")))
    return out


_LIBRARIES = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def _is_library(filename: str) -> bool:
    return filename.startswith(_LIBRARIES) or filename.startswith("<")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
