"""Dynamic dimensions: which input sizes vary in use, how capture keeps them symbolic, and the check at the
entry of a graph that takes only the example's size.

A pruned graph is used on other inputs than the one example it was captured from. What varies in use:

==========================================  =================================  =============================
input (dtype and role)                      varies                             stays as in the example
==========================================  =================================  =============================
every tensor input whose first axis has     axis 0: **batch**
the example's batch size (1-d inputs only
next to batched ones)
integer or boolean 2-d tensors (token ids,  axis 1: **sequence**
attention masks, position and token type
ids); float ``*_mask`` 2-d tensors;
``*embeds`` (``inputs_embeds``)
the main input of a Hugging Face model      axis 1: **samples** (clips of any  --
when it is a 2-d float tensor (raw audio,   length)
``input_values`` of wav2vec2, HuBERT)
images ``(B, C, H, W)``, spectrograms                                          C, H, W; mel bins and frames
``(B, mel, frames)``, any other float                                          (Whisper's encoder takes
tensor                                                                         exactly 3000 frames)
==========================================  =================================  =============================

Axes the caller wants to vary besides (an image's height and width, a spectrogram's frames) are asked for with
``dynamic_shapes=`` (``torch.export``'s format), which ``fxprune.prune`` / ``fxprune.analyze`` pass to export;
a given ``dynamic_shapes`` replaces the table. Image sizes stay static by default because symbolic sizes make
export reason about every window partition and padding (Hugging Face Swin: a minute instead of a second) while a
vision model is used at the resolution it was trained for.

``torch.export`` specialises a dimension whose example size is 0 or 1 even with ``Dim.AUTO`` (and refuses a
``Dim`` for it), so :func:`widened` repeats such an example to size 2 along the dimensions meant to vary; the
graph is then propagated at the caller's own sizes. A dimension meant to vary that ends up static anyway (the
model's forward fixes it, or export failed with symbolic sizes, or a rewrite baked it) is listed in
``gm.meta["fxprune_input_shapes"]`` and gets a check at the graph's entry (:func:`expect_size`) so that another size
fails there with a message that says so, not deep inside in a matrix multiply.

Example::

    >>> dims = varying_dims({"input_ids": torch.zeros(1, 16, dtype=torch.long)})
    >>> [(d.input, d.axis, d.role, d.size) for d in dims]
    [('input_ids', 0, 'batch', 1), ('input_ids', 1, 'sequence', 16)]
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxprune.errors import ShapeError

BATCH, SEQUENCE, SAMPLES, REQUESTED = "batch", "sequence", "samples", "asked for"
SHAPES_META = "fxprune_input_shapes"  # gm.meta key: how the graph was captured and which input sizes it takes


@dataclass(frozen=True)
class VaryingDim:
    """One input axis that varies in use: ``input`` (forward's parameter or placeholder name), its ``axis``,
    ``role`` (batch, sequence, samples) and the example's ``size``."""

    input: str
    axis: int
    role: str
    size: int

    def describe(self) -> str:
        return f"{self.input} dimension {self.axis} ({self.role})"


def axis_roles(name: str, value, batch: int | None, main_input: str | None = None) -> dict[int, str]:
    """``{axis: role}`` of the axes of one input that vary in use (the module docstring's table)."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return {}
    roles = {}
    if value.ndim >= 2 or batch is not None:
        if batch is None or value.shape[0] == batch:
            roles[0] = BATCH
    floating = value.is_floating_point() or value.is_complex()
    if value.ndim >= 2:
        if (not floating and value.ndim == 2) or name.endswith("embeds") or (
                floating and value.ndim == 2 and name.endswith("mask")):
            roles[1] = SEQUENCE
        elif floating and value.ndim == 2 and main_input is not None and name == main_input:
            roles[1] = SAMPLES
    return roles


def symbolic_axes(name: str, value, roles: dict[int, str]) -> list[int]:
    """The axes export should keep symbolic for one input: those that vary, and every axis of a token-like
    tensor (ids, masks; a 3-d ``bbox`` shares the sequence with the ids: a static one would fix it)."""
    if not isinstance(value, torch.Tensor):
        return []
    token = not (value.is_floating_point() or value.is_complex()) or name.endswith("mask")
    return list(range(value.ndim)) if token else sorted(roles)


def varying_dims(inputs: dict, main_input: str | None = None) -> list[VaryingDim]:
    """The axes that vary in use of ``{name: value}`` (forward's bound arguments, or a graph's placeholders)."""
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim >= 1]
    batched = [v for v in tensors if v.ndim >= 2]
    batch = batched[0].shape[0] if batched else None
    return [VaryingDim(name, axis, role, int(value.shape[axis]))
            for name, value in inputs.items()
            for axis, role in axis_roles(name, value, batch, main_input).items()]


def by_input(inputs: dict, dynamic_shapes) -> dict:
    """The caller's ``dynamic_shapes`` as ``{input name: spec}``: a tuple/list in the order of ``inputs``
    (positional, then keyword inputs), or a dict by input name (a keyword passed into ``forward(**kwargs)`` by its
    own name, or nested under that parameter's name as ``torch.export`` wants it)."""
    if isinstance(dynamic_shapes, (tuple, list)):
        return dict(zip(inputs, dynamic_shapes))
    out = {}
    for name, spec in dict(dynamic_shapes or {}).items():
        if name not in inputs and isinstance(spec, dict) and all(k in inputs for k in spec):
            out.update(spec)  # export's nesting of forward(**kwargs)
        else:
            out[name] = spec
    return out


def requested_dims(inputs: dict, dynamic_shapes) -> list[VaryingDim]:
    """The axes the caller's ``dynamic_shapes`` makes dynamic (a ``Dim``, ``Dim.AUTO``/``DYNAMIC``; see
    :func:`by_input`)."""
    out = []
    for name, spec in by_input(inputs, dynamic_shapes).items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor) or spec is None:
            continue
        axes = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for axis, dim in axes:
            if dim is not None and not _is_static_marker(dim):
                out.append(VaryingDim(name, int(axis), REQUESTED, int(value.shape[axis])))
    return out


def _is_static_marker(dim) -> bool:
    """``Dim.STATIC`` (an enum member before torch 2.7, a ``DimHint`` of type STATIC after) or an int."""
    kind = getattr(dim, "type", dim)
    return isinstance(dim, int) or getattr(kind, "name", None) == "STATIC"


def widened(inputs: dict, dims: list[VaryingDim]) -> tuple[dict, list[VaryingDim]]:
    """``inputs`` with every varying axis of size 1 repeated to size 2 (export specialises sizes 0 and 1), and
    the axes that were repeated. Inputs that share a dimension repeat it together (every input of batch 1; the
    ids, mask and position ids of one sequence of length 1); a size-1 axis that varies in no table row (a 3-d
    ``bbox``'s sequence) is not repeated, and export then fails on the mismatch and captures statically, with
    the warning."""
    grown = [d for d in dims if d.size == 1]
    if not grown:
        return inputs, []
    out = dict(inputs)
    for d in grown:
        out[d.input] = torch.cat([out[d.input]] * 2, dim=d.axis)
    return out, grown


def export_spec(inputs: dict, dims: list[VaryingDim], only: bool = False) -> dict:
    """``{name: {axis: Dim.AUTO}}`` for export: the varying axes plus every axis of token-like inputs (with
    ``only``, the varying axes alone)."""
    varying = {}
    for d in dims:
        varying.setdefault(d.input, {})[d.axis] = d.role
    spec = {}
    for name, value in inputs.items():
        token = [] if only else symbolic_axes(name, value, varying.get(name, {}))
        axes = sorted(set(token) | set(varying.get(name, {})))
        spec[name] = {a: torch.export.Dim.AUTO for a in axes} if isinstance(value, torch.Tensor) else None
    return spec


# ---------------------------------------------------------------------------------------------- the CPU budget

class OverBudget(BaseException):
    """Raised inside a capture that ran past its CPU budget (a BaseException: no ``except Exception`` of the
    library it interrupts swallows it)."""


@contextlib.contextmanager
def cpu_budget(seconds: float | None):
    """Raise :class:`OverBudget` in this block at the first module call after the process has used ``seconds``
    of CPU time in it (CPU time: a loaded machine does not shorten it).

    The check is a global forward pre-hook, so the exception starts in plain Python code at a module call of the
    traced forward, never inside a callback that C++ calls (a weakref callback, a destructor), where a signal's
    exception would be dropped or abort the process. Its granularity is one module call.
    """
    if seconds is None:
        yield
        return
    deadline = time.process_time() + seconds

    def check(module, args):
        if time.process_time() > deadline:
            raise OverBudget(f"over its budget of {seconds:.0f} s of CPU time")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- static dimensions

def placeholder_dims(gm: fx.GraphModule, dims: list[VaryingDim], names: dict[str, str]) -> list[dict]:
    """One record per varying dim: ``{"input", "placeholder", "axis", "role", "size", "static"}``; ``names`` maps
    an input to its placeholder's name; ``static``: the captured graph has an int there (export specialised it)."""
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    records = []
    for d in dims:
        node = placeholders.get(names.get(d.input, d.input))
        if node is None:
            continue
        val = node.meta.get("val")
        size = val.shape[d.axis] if isinstance(val, torch.Tensor) and d.axis < val.ndim else None
        records.append({"input": d.input, "placeholder": node.name, "axis": d.axis, "role": d.role, "size": d.size,
                        "static": size is not None and not isinstance(size, torch.SymInt)})
    return records


def static_records(gm: fx.GraphModule) -> list[dict]:
    """The varying dims of ``gm``'s inputs that the graph takes at one size only (from ``gm.meta``)."""
    return [r for r in gm.meta.get(SHAPES_META, {}).get("dims", []) if r["static"]]


def describe(records: list[dict]) -> str:
    """``input_ids dimension 1 (sequence) = 16, ...`` for messages."""
    return ", ".join(f"{r['input']} dimension {r['axis']} ({r['role']}) = {r['size']}" for r in records)


def expect_size(value, axis: int, size: int, what: str, why: str):
    """The check at the entry of a graph captured for one size of ``what`` (an input dimension meant to vary).

    ``value`` is the graph's input; returns nothing. Raises :class:`ShapeError` that says which size the graph
    was captured for and why it is fixed.
    """
    if isinstance(value, torch.Tensor) and value.ndim > axis and value.shape[axis] != size:
        raise ShapeError(f"{what} is {value.shape[axis]}, but this graph was captured for {size} only ({why}); "
                         f"capture it again from an example of the size you need, or prune the model in place")


def add_size_checks(gm: fx.GraphModule, records: list[dict], why: str) -> int:
    """Insert one :func:`expect_size` call per record after the placeholders of ``gm``; the number inserted
    (checks already there are not repeated)."""
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    present = {(n.args[0].name, n.args[1]) for n in gm.graph.find_nodes(op="call_function", target=expect_size)}
    last = list(placeholders.values())[-1] if placeholders else None
    added = 0
    for r in records:
        node = placeholders.get(r["placeholder"])
        if node is None or (node.name, r["axis"]) in present:
            continue
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(
                expect_size, (node, r["axis"], r["size"], f"{r['input']} dimension {r['axis']} ({r['role']})", why))
        last.meta["val"] = None  # a complete value map: export's values stay reusable
        added += 1
    if added:
        gm.recompile()
    return added


def record(gm: fx.GraphModule, method: str, why: str, records: list[dict], **more) -> dict:
    """Set ``gm.meta["fxprune_input_shapes"]`` (how the graph was captured, which input sizes it takes); return it."""
    info = {"capture": method, "why": why, "dims": records, **more}
    gm.meta[SHAPES_META] = info
    return info


def other_sizes(size: int) -> int:
    """A size to try a dimension at other than its example's: neither 0, 1, 2 (the sizes a capture may have
    repeated it to) nor ``size``; the nearest below if there is one (position tables have a maximum)."""
    for candidate in (size - 1, size + 1, size + 2):
        if candidate > 2 and candidate != size:
            return candidate
    return 3


def record_traced(gm: fx.GraphModule, flat_inputs: tuple, dynamic_shapes, method: str) -> dict:
    """Record the varying dims of a graph whose sizes are symbolic by construction (symbolic_trace, or a
    GraphModule the caller passed): none is static yet; :func:`fxprune.rewriting.verify.verify_other_sizes`
    tries them."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = {n.target.lstrip("*"): v for n, v in zip(placeholders, flat_inputs)}
    names = {n.target.lstrip("*"): n.name for n in placeholders}
    dims = requested_dims(inputs, dynamic_shapes) if dynamic_shapes is not None else varying_dims(inputs)
    records = [{"input": d.input, "placeholder": names[d.input], "axis": d.axis, "role": d.role, "size": d.size,
                "static": False} for d in dims]
    return record(gm, method, "", records, shapes="dynamic")


def resized(value: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``value`` cut or repeated along ``axis`` to ``size`` (an input of another batch size or length)."""
    copies = -(-size // value.shape[axis]) if value.shape[axis] else 1
    return torch.cat([value] * copies, dim=axis).narrow(axis, 0, size)
