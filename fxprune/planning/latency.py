"""Latency on the device the model sits on: whole-model ratios, and per-layer tables over candidate widths.

Latency is not MACs: a 1x1 convolution with 250 channels can be slower than one with
256, and small layers are bound by memory or launch overhead. So the latency-aware
planner (:mod:`fxprune.planning.latency_target`) looks latency up in tables measured
here, by running each weighted layer alone (``F.linear`` / ``F.conv*``) with random
tensors of the candidate widths, on the model's device and dtype.

A :class:`LayerTable` covers one layer: its output width (weight axis 0) and input
width (weight axis 1, times the groups) each take a few candidate values (the full
width, 3/4, 1/2 and 1/4, rounded to the alignment), and latency in between is
interpolated bilinearly. Identical layers (ResNet's repeated bottlenecks, a
transformer's layers) share one measurement: tables are cached by the layer's
signature, device and dtype for the life of the process.

Example::

    >>> tables = layer_tables(dg, alignment=16)        # {weight name: LayerTable}
    >>> tables["layer1.0.conv2.weight"].at(out=48, inp=64)   # seconds, interpolated
    0.00021
    >>> ratio_of(pruned, model, inputs)                 # latency(pruned) / latency(model), measured together
    0.52
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # candidate widths, as fractions of the original
_CACHE: dict[tuple, float] = {}  # (device, dtype, signature, out, in) -> seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Shortest wall time of ``fn()`` in seconds (CUDA synchronised): other work only ever adds time."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return min(times)


def ratio_of(candidate, reference, args, kwargs=None, rounds: int = 8, warmup: int = 20, repeat: int = 3) -> float:
    """``latency(candidate) / latency(reference)`` on the same inputs, timed alternately in one run.

    Alternating the two (rather than timing one, then the other) makes the ratio robust
    to a machine whose speed drifts (turbo, thermal limits, a neighbour on a shared host): each
    round's two runs see the same machine, so the median of the per-round ratios cancels it.
    Within a round each model runs ``repeat`` times and keeps its fastest run: being preempted
    only ever adds time, so the minimum is the run the machine did not disturb (on a 2-core VM
    shared with other jobs, medians of single runs drifted by 15-25% between measurements of the
    same plan, medians of minima of three by about 5%).
    """
    kwargs = kwargs or {}
    device = _device_of(reference)
    a, b = [], []

    def fastest(model):
        best = math.inf
        for _ in range(repeat):
            _sync(device)
            start = time.perf_counter()
            model(*args, **kwargs)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    with torch.inference_mode():
        # a freshly built model runs slower for its first dozen calls (allocator, kernel caches): warm both
        # up, up to ``warmup`` rounds or two seconds, whichever ends first (at least two rounds)
        start = time.perf_counter()
        for i in range(warmup):
            candidate(*args, **kwargs)
            reference(*args, **kwargs)
            if i >= 1 and time.perf_counter() - start > 2.0:
                break
        for _ in range(rounds):
            a.append(fastest(reference))
            b.append(fastest(candidate))
    return statistics.median(tb / ta for ta, tb in zip(a, b))


def _device_of(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class LayerTable:
    """Latency of one weighted layer over candidate (output, input) widths; bilinear in between."""

    weight: str  # the parameter's name in the graph
    outs: np.ndarray  # candidate output widths, increasing
    ins: np.ndarray  # candidate input widths, increasing
    seconds: np.ndarray  # [len(outs), len(ins)]

    def at(self, out: int, inp: int) -> float:
        i = np.interp(out, self.outs, np.arange(len(self.outs)))
        j = np.interp(inp, self.ins, np.arange(len(self.ins)))
        i0, j0 = int(np.floor(i)), int(np.floor(j))
        i1, j1 = min(i0 + 1, len(self.outs) - 1), min(j0 + 1, len(self.ins) - 1)
        fi, fj = i - i0, j - j0
        s = self.seconds
        return float((1 - fi) * ((1 - fj) * s[i0, j0] + fj * s[i0, j1]) + fi * ((1 - fj) * s[i1, j0] + fj * s[i1, j1]))


@dataclass
class WeightedLayer:
    """A linear or convolution call of the graph, with what it takes to run it alone."""

    node: fx.Node
    weight: str  # parameter name
    kind: str  # "linear" | "conv"
    input_shape: tuple
    weight_shape: tuple
    options: dict  # conv: stride, padding, dilation, groups
    depthwise: bool = False

    @property
    def signature(self) -> tuple:
        return (self.kind, self.input_shape, self.weight_shape, tuple(sorted(self.options.items())))

    def run_at(self, out: int, inp: int, device, dtype):
        """A closure that runs this layer with ``out`` output and ``inp`` input channels."""
        x_shape = list(self.input_shape)
        if self.kind == "linear":
            x_shape[-1] = inp
            x = torch.randn(x_shape, device=device, dtype=dtype)
            w = torch.randn(out, inp, device=device, dtype=dtype)
            return lambda: F.linear(x, w)
        groups = out if self.depthwise else self.options["groups"]
        x_shape[1] = out if self.depthwise else inp
        x = torch.randn(x_shape, device=device, dtype=dtype)
        w = torch.randn((out, x_shape[1] // groups) + tuple(self.weight_shape[2:]), device=device, dtype=dtype)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(self.weight_shape)]
        opts = {k: v for k, v in self.options.items() if k != "groups"}
        return lambda: conv(x, w, groups=groups, **opts)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)


def weighted_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Every ``nn.Linear`` / ``nn.Conv*`` call and functional linear / conv on a weight of the graph.

    Transposed convolutions and other ops are left to the rest of the model, whose latency
    the planner treats as fixed (its measured ratio corrects for that).
    """
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        x = node.args[0] if node.args else None
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(x_val, torch.Tensor):
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Linear,) + _CONVS):
            module = modules[node.target]
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            options = {} if kind == "linear" else dict(stride=module.stride, padding=module.padding,
                                                      dilation=module.dilation, groups=module.groups)
            if kind == "conv" and module.padding_mode != "zeros":
                continue
            weight = f"{node.target}.weight"
            shape = tuple(module.weight.shape)
        elif node.op == "call_function" and (node.target in (F.linear, torch.ops.aten.linear.default)
                                             or node.target in _CONV_FUNCTIONS):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            kind = "conv" if node.target in _CONV_FUNCTIONS else "linear"
            names = ("stride", "padding", "dilation", "groups")
            defaults = dict(stride=1, padding=0, dilation=1, groups=1)
            options = {} if kind == "linear" else {
                n: (node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, defaults[n]))
                for i, n in enumerate(names)}
            if kind == "conv" and isinstance(options["padding"], str):
                continue
            weight, shape = w.target, tuple(w.meta["val"].shape)
        else:
            continue
        depthwise = kind == "conv" and options["groups"] > 1 and shape[1] == 1 and options["groups"] == shape[0]
        if kind == "conv" and options["groups"] > 1 and not depthwise:
            continue  # grouped, not depthwise: widths move in steps of the groups; left to the rest
        out.append(WeightedLayer(node, weight, kind, tuple(x_val.shape), shape, options, depthwise))
    return out


def _candidates(size: int, alignment: int) -> np.ndarray:
    widths = {size}
    for f in FRACTIONS[1:]:
        w = int(round(size * f / alignment)) * alignment if size >= 2 * alignment else int(round(size * f))
        if w >= 1:
            widths.add(w)
    return np.array(sorted(widths))


def measure_layer(layer: WeightedLayer, out: int, inp: int, device, dtype) -> float:
    """Seconds ``layer`` takes at these widths, measured alone (cached for the process)."""
    key = (str(device), str(dtype), layer.signature, int(out), int(inp))
    if key not in _CACHE:
        _CACHE[key] = time_call(layer.run_at(int(out), int(inp), device, dtype), device)
    return _CACHE[key]


def table_for(layer: WeightedLayer, alignment: int, device, dtype, timer=measure_layer) -> LayerTable:
    """The latency of ``layer`` over candidate widths; ``timer(layer, out, inp, device, dtype)`` gives seconds."""
    out_size = layer.weight_shape[0]
    in_size = layer.input_shape[-1] if layer.kind == "linear" else layer.input_shape[1]
    outs = _candidates(out_size, alignment)
    ins = outs if layer.depthwise else _candidates(in_size, alignment)
    seconds = np.zeros((len(outs), len(ins)))
    for i, o in enumerate(outs):
        for j, c in enumerate(ins):
            if layer.depthwise and o != c:
                continue
            seconds[i, j] = timer(layer, int(o), int(c), device, dtype)
    if layer.depthwise:  # a depthwise layer's input follows its output: the diagonal is the table
        diagonal = np.diag(seconds).copy()
        seconds = np.repeat(diagonal[:, None], len(ins), axis=1)
    return LayerTable(layer.weight, outs, ins, monotone(seconds))


def monotone(seconds: np.ndarray) -> np.ndarray:
    """Never slower when narrower, along both widths: timing noise (and the odd kernel choice) must not make
    the planner believe that removing channels costs time. The mean of the running maximum from the narrow
    end and the running minimum from the wide end, so one noisy cell flattens neither end of the table."""
    def along(a, axis):
        up = np.maximum.accumulate(a, axis=axis)
        down = np.flip(np.minimum.accumulate(np.flip(a, axis=axis), axis=axis), axis=axis)
        return (up + down) / 2
    return along(along(seconds, 0), 1)


def layer_tables(gm: fx.GraphModule, alignment: int, device=None, dtype=None,
                 timer=measure_layer) -> list[tuple[WeightedLayer, LayerTable]]:
    """A table for every weighted layer of ``gm`` (see :func:`weighted_layers`)."""
    params = dict(gm.named_parameters())
    out = []
    for layer in weighted_layers(gm):
        p = params.get(layer.weight)
        dev = device or (p.device if p is not None else torch.device("cpu"))
        typ = dtype or (p.dtype if p is not None else torch.float32)
        if dev.type == "meta":
            raise ValueError("target_latency needs real weights on a real device (the model is on the meta device)")
        out.append((layer, table_for(layer, alignment, dev, typ, timer)))
    return out
