"""A captured graph cut into its repeated blocks (decoder layers), and run one block at a time.

The blocks are found from the graph and the model, not from names: of the model's ``nn.ModuleList``s with at
least two children, the one whose children hold the most parameters (a transformer's layers). Every node of
the graph whose ``nn_module_stack`` passes through child ``i`` of that list belongs to block ``i``; the graph
is then cut, in execution order, into

- a head segment: what runs before the first block (the embedding, rotary position embeddings, masks),
- one segment per block (``model.layers.3``), and nodes outside any block that run between two blocks with
  the block before them,
- a tail segment: what runs after the last block (the final norm, the LM head).

Blocks must run one after the other: a graph that comes back into a block it left raises ``ValueError``
naming the node. ``get_attr`` nodes (parameters and buffers) belong to no segment; each segment lists those
its nodes read (``Segment.attrs``), so that only those need to be in memory while it runs, and the values
that cross its end (``Segment.live_out``: the hidden states, position embeddings, masks, the inputs a later
segment reads) are what a caller carries from one segment to the next.

:class:`SegmentRunner` runs one segment for one batch from the carried values and the segment's tensors. The
graph may have been captured on the meta device: device constants in it (``arange(..., device="meta")``,
``to(device)``) are replaced by the device it runs on.

Example::

    >>> segments = segments_of(dg.gm, dg.model)
    >>> [s.name for s in segments]
    ['<head>', 'model.layers.0', 'model.layers.1', '<tail>']
    >>> runner = SegmentRunner(dg.gm, "cpu")
    >>> carry = runner.inputs(batch)                               # {placeholder: value}
    >>> for s in segments:
    ...     carry = runner.run_segment(s, carry, {a.target: load(a.target) for a in s.attrs})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map

from fxprune.calibration.statistics import placeholder_values
from fxprune.errors import source_line

HEAD, TAIL = "<head>", "<tail>"


@dataclass
class Segment:
    """One block of the graph: the nodes it runs, the tensors it reads, the values it hands on."""

    index: int
    name: str  # the block's module path ("model.layers.3"), or HEAD / TAIL
    nodes: list = field(default_factory=list)  # fx nodes in execution order (no placeholder, get_attr, output)
    attrs: list = field(default_factory=list)  # get_attr nodes its nodes read
    live_out: list = field(default_factory=list)  # nodes of this or earlier segments read after it ends

    def __repr__(self):
        return f"Segment({self.index}, {self.name!r}, {len(self.nodes)} nodes, {len(self.attrs)} tensors)"


def repeated_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """``(list name, [child names])`` of the ``nn.ModuleList`` whose children hold the most parameters.

    Example::

        >>> repeated_blocks(llama)
        ('model.layers', ['model.layers.0', 'model.layers.1'])
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of two or more blocks holding parameters: "
                         "layer-by-layer calibration runs the model one repeated block (decoder layer) at a time")
    children = [f"{best}.{child}" if best else child for child, _ in model.get_submodule(best).named_children()]
    return best, children


def _block_of(node: fx.Node, blocks: set) -> str | None:
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else value
        if path in blocks:
            return path
    return None


def segments_of(gm: fx.GraphModule, model: nn.Module) -> list[Segment]:
    """The head segment, one segment per block of :func:`repeated_blocks` (``model``), and the tail, in order."""
    _, children = repeated_blocks(model)
    blocks = set(children)
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    owner = {n: _block_of(n, blocks) for n in order}
    in_blocks = [i for i, n in enumerate(order) if owner[n] is not None]
    if not in_blocks:
        raise ValueError(f"no node of the captured graph runs inside {children[0]} (its nn_module_stack): the "
                         "graph cannot be cut into blocks")
    last = in_blocks[-1]
    segments = [Segment(0, HEAD)]
    seen = set()
    for i, n in enumerate(order):
        block = owner[n]
        if block is not None and block != segments[-1].name:
            if block in seen:
                raise ValueError(f"the graph runs {block} again after {segments[-1].name} (node {n.name}"
                                 f"{_where(n)}): its blocks interleave, so it cannot be run one block at a time")
            seen.add(block)
            segments.append(Segment(len(segments), block))
        elif i == last + 1:
            segments.append(Segment(len(segments), TAIL))
        segments[-1].nodes.append(n)
    if not segments[0].nodes:
        segments.pop(0)
        for i, s in enumerate(segments):
            s.index = i
    _fill(gm, segments)
    return segments


def _where(node: fx.Node) -> str:
    line = source_line(node)
    return f", {line}" if line else ""


def _fill(gm: fx.GraphModule, segments: list[Segment]) -> None:
    """Each segment's ``attrs`` and ``live_out``."""
    seg = {n: s.index for s in segments for n in s.nodes}
    for n in gm.graph.find_nodes(op="placeholder"):
        seg[n] = -1
    end = len(segments)
    last_use = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" or n not in seg:
            continue
        uses = [end if u.op == "output" else seg[u] for u in n.users]
        last_use[n] = max(uses, default=seg[n])
    for s in segments:
        attrs = {a: None for n in s.nodes for a in n.all_input_nodes if a.op == "get_attr"}
        s.attrs = list(attrs)
        s.live_out = [n for n, used in last_use.items() if seg[n] <= s.index < used]


class SegmentRunner(fx.Interpreter):
    """Runs the nodes of one :class:`Segment` at a time on ``device``, from the values carried into it.

    ``watch`` (``{call node: (input node, fn)}``) hands a call's input value to ``fn`` before the call runs; with
    ``stop=True`` the segment stops after the last watched call (what follows it is not needed then).
    """

    def __init__(self, gm: fx.GraphModule, device="cpu"):
        super().__init__(gm)
        self.device = torch.device(device)

    def inputs(self, batch) -> dict:
        """``{placeholder node: value on the device}`` of one calibration batch."""
        values = placeholder_values(self.module, batch)
        return {n: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                for n, v in zip(self.module.graph.find_nodes(op="placeholder"), values)}

    def run_segment(self, segment: Segment, carried: dict, tensors: dict, watch: dict | None = None,
                    stop: bool = False) -> dict | None:
        """The values ``segment.live_out`` (``{node: value}``) after running ``segment`` from ``carried`` (the
        previous segment's ``live_out`` values, or :meth:`inputs`) with ``tensors`` (``{get_attr target:
        tensor}``); None when ``stop`` ended it early."""
        watch = watch or {}
        last = max((i for i, n in enumerate(segment.nodes) if n in watch), default=None) if stop else None
        self.env = dict(carried)
        for a in segment.attrs:
            if a.target not in tensors:
                raise KeyError(f"{segment.name}: no tensor {a.target!r} given for get_attr node {a.name}")
            self.env[a] = tensors[a.target]
        keep = set(segment.live_out)
        try:
            for i, n in enumerate(segment.nodes):
                if n in watch:
                    source, fn = watch[n]
                    fn(self.env[source])
                if i == last:
                    return None
                self.env[n] = self.run_node(n)
                for dead in self.user_to_last_uses.get(n, []):  # free what no later node of the graph reads
                    if dead not in keep:
                        self.env.pop(dead, None)
            return {n: self.env[n] for n in segment.live_out}
        finally:
            self.env = {}

    def _on_device(self, args, kwargs):
        # a graph captured on the meta device holds meta device constants: they become the run device
        swap = lambda a: self.device if isinstance(a, torch.device) and a.type == "meta" else a  # noqa: E731
        return tree_map(swap, args), tree_map(swap, kwargs)

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *self._on_device(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._on_device(args, kwargs))
