"""Propagate: shapes into ``node.meta["val"]`` (meta tensors, or FakeTensors where a graph needs them); no real
compute, no real memory.

Example::

    >>> gm = fxprune.capture(model)
    >>> propagate(gm, (torch.randn(1, 3, 32, 32),))
    >>> gm.graph.find_nodes(op="output")[0].args[0].meta["val"].shape
    torch.Size([1, 10])

Inputs may be real tensors, meta tensors or ``torch.Size``/tuples (a shape:
a float32 tensor of that shape is assumed). A model whose parameters live on
the meta device is analysed with meta inputs, so nothing is allocated.

Nodes whose output depends on tensor *values* (``.item()``, ``.tolist()``,
``nonzero``, ``unique``, ``x[mask]``, a branch on ``x.sum() > 0`` inside a leaf
module) have no shape without data: those alone are run for real on the example
inputs (with the model's own weights), everything else stays FakeTensor. The
nodes are marked ``node.meta["fxprune_concrete"]``, their names kept in
``gm.meta["fxprune_value_dependent"]``, and one warning names them with their
source lines: shapes that follow from them hold for these example inputs.
ultralytics' Detect head in eval mode reads its stride buffer with ``.item()``::

    >>> propagate(yolo_graph, (torch.randn(1, 3, 64, 64),))      # doctest: +SKIP
    UserWarning: fxprune: 3 node(s) read tensor values ... 'item' at .../head.py:201 ...

Details. A graph that capture has just exported from these inputs keeps the FakeTensors export left when every node
has one and every size is an int (a static export: in-place Hugging Face pruning, and ``fxprune.count``'s graph;
``reuse_export_values``, kept as propagation would record them, the output node given its arguments' values): a
second propagation would find the same shapes. A dynamic export's symbolic sizes, nodes capture added (inlined
constants) or a GraphModule the caller passed (exported from other inputs, perhaps) are propagated. Propagation runs
first on meta tensors (parameters, buffers and devices swapped for meta: plain kernels, faster than a first
FakeTensorProp run; not measured in a committed result); any failure there (data-dependent ops, CPU constants made
in forward, RNN weight caches) falls back to FakeTensorProp.

Where FakeTensorProp raises for a node whose output depends on values (``VALUE_DEPENDENT``: FakeTensor's
``DataDependentOutputException``, ``DynamicOutputShapeException``, ``GuardOnDataDependentSymNode``), propagation
starts again with those nodes run for real on the example inputs (``_ValueDependentProp``: each such node's
ancestors are computed on demand, once, under ``no_grad``, with the model's own parameters and copies of its
buffers, so a train-mode BatchNorm's statistics stay put). A pruned graph's re-propagation does not warn again.
Shapes, meta or fake example inputs cannot run such nodes: ``ShapeError`` naming the node. Every propagation runs
inside ``capture.attributes_restored(gm)`` (a leaf module caching on ``self`` keeps no stand-in). Parameters and
buffers are swapped for fake ones while propagating (dispatch cache hits, and a train-mode BatchNorm cannot bump the
real ``num_batches_tracked``); list and dict arguments are passed as plain mutable containers, as the generated code
passes them (Swin3D assigns into its ``window_size`` list).
"""

from __future__ import annotations

import contextlib
import operator
import warnings

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.fx.experimental.proxy_tensor import snapshot_fake
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxprune.analysis.capture import attributes_restored
from fxprune.errors import ShapeError, describe_node, source_line

# what FakeTensor raises where an output (its value, or its shape) depends on the data
VALUE_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)


def example_from_meta(gm: fx.GraphModule) -> tuple | None:
    """Inputs rebuilt from placeholder metadata left by an earlier propagation or by torch.export."""
    vals = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        if val is None:
            return None
        vals.append(val)
    return tuple(vals)


def propagate(gm: fx.GraphModule, example_inputs) -> None:
    """Fill ``node.meta["val"]`` for every node; raise :class:`ShapeError` naming the failing node."""
    if example_inputs is None:
        example_inputs = example_from_meta(gm)
        if example_inputs is None:
            raise ShapeError(
                "fxprune needs example_inputs to learn the graph's shapes, e.g. "
                "example_inputs=(torch.randn(1, 3, 224, 224),)"
            )
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        node.meta.pop("fxprune_concrete", None)
    with attributes_restored(gm):  # a leaf module's forward may cache on self: not these stand-ins
        _propagate(gm, example_inputs)


def propagate_new(gm: fx.GraphModule, example_inputs) -> None:
    """Fill ``node.meta["val"]`` of the nodes that lack one (a pass inserted them: decomposition) from the values
    of the nodes before them, where every recorded value is a meta tensor; else :func:`propagate` the whole graph.

    A pass that replaces a module call by its ops leaves the shapes around it as they were, so only the new nodes
    need computing: on vit_b_16 this takes 0.01 s where propagating again takes 0.15 s.

    Example::

        >>> propagate(gm, inputs); decompose(gm)            # the decomposed attention's nodes have no "val"
        >>> propagate_new(gm, inputs)                       # now they do; the others keep theirs
    """
    if not _all_meta(gm) or not _propagate_missing(gm):
        propagate(gm, example_inputs)


def _propagate(gm: fx.GraphModule, example_inputs) -> None:
    """Meta tensors first, else FakeTensorProp, else FakeTensorProp running value-dependent nodes for real."""
    if _propagate_on_meta(gm, example_inputs):
        return
    device = _device_of(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = tuple(_fake(mode, x, device) for x in example_inputs)
    try:
        with _swapped_tensors(gm, lambda t: mode.from_tensor(t, static_shapes=True)):
            _MutableArgsProp(gm, mode).propagate(*fakes)
    except VALUE_DEPENDENT:  # .item(), nonzero, masks: those nodes run for real on the example inputs
        _propagate_with_values(gm, example_inputs, device)
    except Exception as exc:  # report the node, not FakeTensorProp's internals
        raise _failure(gm, exc) from exc


def _failure(gm: fx.GraphModule, exc: Exception) -> ShapeError:
    node = _failing_node(gm)
    where = describe_node(node) if node is not None else "the graph"
    return ShapeError(f"shape propagation failed at {where}: {type(exc).__name__}: {_first_line(exc)}")


def _propagate_with_values(gm: fx.GraphModule, example_inputs, device: torch.device) -> None:
    """FakeTensor propagation in which the nodes FakeTensor cannot compute (their output depends on values) are
    run for real on ``example_inputs``; records them and warns once per graph (see the module docstring).

    Parameters stay real (the real runs read them; FakeTensorMode converts them for the other nodes), buffers are
    swapped for copies (a train-mode BatchNorm that runs for real updates only the copy's statistics).
    """
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = tuple(_fake(mode, x, device) for x in example_inputs)
    prop = _ValueDependentProp(gm, mode, example_inputs)
    try:
        with _swapped_tensors(gm, lambda t: t.clone(), buffers_only=True):
            prop.propagate(*fakes)
    except ShapeError:
        raise
    except Exception as exc:
        raise _failure(gm, exc) from exc
    names = list(prop.concrete)
    if gm.meta.get("fxprune_value_dependent") != names:  # once per graph: not again for its re-propagations
        gm.meta["fxprune_value_dependent"] = names
        warnings.warn(f"fxprune: {len(names)} node(s) read tensor values, so FakeTensor cannot give their shapes: "
                      f"{_by_source_line(prop.concrete.values())}. They were run for real on the example inputs; "
                      f"the shapes that follow from them hold for these inputs (node.meta['fxprune_concrete'])",
                      stacklevel=4)


def _by_source_line(nodes, limit: int = 4) -> str:
    """``'item', 'item_1' (item) at head.py:201: y = ...; 'nonzero' (nonzero) at ...``: nodes grouped by line."""
    lines: dict[str, list[fx.Node]] = {}
    for node in nodes:
        lines.setdefault(source_line(node), []).append(node)
    parts = []
    for where, group in list(lines.items())[:limit]:
        ops = ", ".join(dict.fromkeys(str(getattr(n.target, "__name__", n.target)) for n in group))
        parts.append(", ".join(repr(n.name) for n in group) + f" ({ops})" + (f" at {where}" if where else ""))
    more = f"; and {len(lines) - limit} more source line(s)" if len(lines) > limit else ""
    return "; ".join(parts) + more


def reuse_export_values(gm: fx.GraphModule) -> bool:
    """Keep the shapes ``torch.export`` left in ``node.meta["val"]`` when they are all static; True if kept.

    Call it only on a graph that was just exported from the very inputs it will be analysed with
    (the capture pass does): export traced those inputs through FakeTensors, so a second
    propagation would compute the same sizes again (0.5 s of CPU time on an 80-layer 70B-class
    LLaMA). Kept only where every node but the output has a value and every size is an ``int``: a
    dynamic export's symbolic sizes, or a node that capture added afterwards (constants of an
    inlined no_grad region), leave the graph to :func:`propagate`. Values are kept as
    propagation records them (tensors and numbers; other objects dropped), and the output node
    gets the structure of its arguments' values.

    Example::

        >>> gm = capture(hf_model, (ids,), dynamic=False)
        >>> reuse_export_values(gm) or propagate(gm, (ids,))
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if not all("val" in n.meta and _static(n.meta["val"]) for n in nodes):
        return False
    for node in nodes:  # what propagation records: tensors and numbers, containers of them
        val = map_aggregate(node.meta.pop("val"), _recorded)
        if val is not None:
            node.meta["val"] = val
    output = gm.graph.find_nodes(op="output")[0]
    output.meta["val"] = map_aggregate(output.args[0], lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a)
    return True


def _recorded(obj):
    """A value as :func:`_snapshot` records it (not detached: export's values are leaves)."""
    return obj if isinstance(obj, (torch.Tensor, int, float, bool)) else None


def _static(val) -> bool:
    """Every size (and every number) in a recorded value is a plain int, not a symbol."""
    if isinstance(val, torch.Tensor):
        return all(type(s) is int for s in val.shape)
    if isinstance(val, (tuple, list)):
        return all(_static(v) for v in val)
    return not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool))


class _MutableArgs:
    """Interpreter mixin that passes list and dict arguments as plain (mutable) containers.

    The generated code builds a fresh list for every call, and some models mutate it:
    torchvision's Swin3D ``_get_window_and_shift_size`` assigns ``window_size[i]``.
    The Interpreter would pass fx's immutable_list and fail where the model runs fine.
    """

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args, self.leaf), _mutable(kwargs, self.leaf)

    @staticmethod
    def leaf(value):
        """Each non-container argument, as the subclass wants it passed."""
        return value


class _MutableArgsProp(_MutableArgs, FakeTensorProp):
    pass


class _ValueDependentProp(_MutableArgsProp):
    """FakeTensorProp that runs a node for real where FakeTensor raises :data:`VALUE_DEPENDENT` for it.

    The real value of such a node needs the real values of its ancestors: they are computed on demand
    (:class:`_RealValues`, each node at most once), so a graph whose only value read is ``stride[i].item()``
    on a buffer runs three tiny real ops, not the model. ``concrete``: ``{node name: node}`` run for real.
    """

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, example_inputs) -> None:
        super().__init__(gm, mode)
        self.extra_traceback = False  # our ShapeError names the node already
        self.real = _RealValues(gm, example_inputs)
        self.concrete: dict[str, fx.Node] = {}

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except VALUE_DEPENDENT as exc:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        with unset_fake_temporarily(), torch.no_grad():
            real = self.real.value(n, reason)
        result = map_aggregate(real, lambda v: self._mode.from_tensor(v, static_shapes=True)
                               if isinstance(v, torch.Tensor) else v)
        val = map_aggregate(result, lambda v: snapshot_fake(v) if isinstance(v, torch.Tensor) else
                            v if isinstance(v, (int, float, bool)) else None)
        if val is not None:
            n.meta["val"] = val
        n.meta["fxprune_concrete"] = reason
        self.concrete[n.name] = n
        return result


class _RealValues(_MutableArgs, fx.Interpreter):
    """Real values of nodes, computed on demand from the example inputs and the module's own tensors.

    ``value(node)`` runs the node's ancestors that have no value yet, in graph order, under ``no_grad``;
    values are kept for later requests (only ancestors of value-dependent nodes are ever computed).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.env = {}
        self.inputs = example_inputs
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}

    def value(self, node: fx.Node, reason: str):
        if node not in self.env:
            needed, stack = set(), [node]
            while stack:
                current = stack.pop()
                if current in self.env or current in needed:
                    continue
                needed.add(current)
                stack.extend(current.all_input_nodes)
            if any(n.op == "placeholder" for n in needed):
                self._bind_inputs(node, reason)
            for current in sorted(needed, key=self.order.__getitem__):
                if current not in self.env:
                    try:
                        self.env[current] = self.run_node(current)
                    except Exception as exc:
                        at = "" if current is node else f" at {describe_node(current)}"
                        raise ShapeError(
                            f"{describe_node(node)} reads tensor values ({reason}), so fxprune runs it for real on "
                            f"the example inputs, which failed{at}: {type(exc).__name__}: {_first_line(exc)}") from exc
        return self.env[node]

    def _bind_inputs(self, node: fx.Node, reason: str) -> None:
        """The real example inputs as the placeholders' values (once); a shape or a meta tensor has no values."""
        if any(n.op == "placeholder" for n in self.env):
            return
        if any(_is_shape(x) or isinstance(x, FakeTensor) or (isinstance(x, torch.Tensor) and x.device.type == "meta")
               for x in self.inputs):
            raise ShapeError(
                f"{describe_node(node)} reads tensor values ({reason}): fxprune runs such nodes for real on the "
                f"example inputs, so it needs real tensors (and real weights), not shapes, meta or fake tensors: "
                f"pass example_inputs=(torch.randn(...),)")
        inputs = self.graph.process_inputs(*self.inputs)  # as Interpreter.run binds them (an export's pytree)
        for placeholder, value in zip(self.graph.find_nodes(op="placeholder"), inputs):
            self.env[placeholder] = value


class _MetaProp(_MutableArgs, fx.Interpreter):
    """Shape propagation on meta tensors: plain kernels, no FakeTensor dispatch.

    FakeTensorProp's first run over a graph pays for building its dispatch caches
    (0.75 s on densenet121 against 0.13 s on meta tensors). Meta tensors cannot
    stand in for everything (data-dependent ops, CPU constants made in forward,
    device checks), so any failure falls back to FakeTensorProp.
    """

    @staticmethod
    def leaf(value):
        # every tensor lives on meta here: ``x.to("cpu")`` and ``arange(n, device=cpu)`` stay there too
        return torch.device("meta") if isinstance(value, torch.device) else value

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        val = map_aggregate(result, _snapshot)
        if val is not None:
            n.meta["val"] = val
        return result

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return _on_meta(value) if isinstance(value, torch.Tensor) else value


def _snapshot(obj):
    """What FakeTensorProp records: tensors (a detached alias keeps this node's shape), numbers; else None."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    return obj if isinstance(obj, (int, float, bool, torch.SymInt)) else None


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _propagate_on_meta(gm: fx.GraphModule, example_inputs) -> bool:
    """Propagate on meta tensors; False (and nothing recorded) when the graph needs FakeTensorProp."""
    if any(hasattr(m, "_flat_weights") for m in gm.modules()):  # RNNs cache their weights: leave them real
        return False
    try:
        inputs = tuple(_on_meta(x) if isinstance(x, torch.Tensor) else
                       torch.empty(tuple(x), device="meta") if _is_shape(x) else x for x in example_inputs)
        with _swapped_tensors(gm, _on_meta):
            _MetaProp(gm).run(*inputs)
        return True
    except Exception:  # data-dependent ops, CPU constants, symbolic sizes...: FakeTensorProp handles them
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        return False


def _all_meta(gm: fx.GraphModule) -> bool:
    seen = False
    for node in gm.graph.nodes:
        if node.op == "output" or node.meta.get("fxprune_concrete"):
            continue
        for leaf in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(leaf, torch.Tensor):
                if leaf.device.type != "meta" or isinstance(leaf, FakeTensor):
                    return False
                seen = True
            elif isinstance(leaf, torch.SymInt):
                return False
    return seen


def _propagate_missing(gm: fx.GraphModule) -> bool:
    """Compute, on meta tensors, the value of every node that lacks one from its arguments' recorded values (fresh
    aliases: an in-place op leaves a record as it was); False, with nothing recorded, where a node is not a plain
    function, method or attribute (a module call needs the full propagation's swapped tensors)."""
    made = []

    def value(arg):
        return map_aggregate(arg.meta["val"], lambda v: v.detach() if isinstance(v, torch.Tensor) else v)

    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op in ("output", "placeholder") or "val" in node.meta:
                    continue  # an input without a value (None) is no new node; a node that reads one fails below
                args, kwargs = _mutable(fx.node.map_arg((node.args, node.kwargs), value), _MetaProp.leaf)
                if node.op == "call_function":
                    result = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "get_attr":
                    result = operator.attrgetter(node.target)(gm)
                    result = _on_meta(result) if isinstance(result, torch.Tensor) else result
                else:
                    raise LookupError(node.op)
                made.append(node)
                node.meta["val"] = map_aggregate(result, _snapshot)
        return True
    except Exception:  # whatever the full propagation would handle (FakeTensor, values, modules): leave it to it
        for node in made:
            node.meta.pop("val", None)
        return False


def _is_shape(x) -> bool:
    return isinstance(x, (torch.Size, list)) or (isinstance(x, tuple) and all(isinstance(s, int) for s in x))


def _mutable(value, leaf):
    """Lists and dicts rebuilt as plain containers (immutable_list is a list subclass), ``leaf`` applied inside."""
    if isinstance(value, list):
        return [_mutable(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(_mutable(v, leaf) for v in value) if type(value) is tuple else value
    if isinstance(value, dict):
        return {k: _mutable(v, leaf) for k, v in value.items()}
    return leaf(value)


@contextlib.contextmanager
def _swapped_tensors(gm: fx.GraphModule, convert, buffers_only: bool = False):
    """Every parameter and buffer replaced by ``convert(tensor)`` while propagating, then the originals put back.

    Propagating over meta or fake parameters never touches the real ones (a train-mode
    BatchNorm bumps only the stand-in's ``num_batches_tracked``). With FakeTensorMode,
    fake parameters also let it hit its dispatch cache instead of converting real ones
    on every op (and rerunning, e.g., the batch-norm decomposition): ~1.5x faster.
    Tied tensors stay tied (one stand-in per tensor). RNN modules keep theirs: they
    cache their weights in a list (the meta path does not run on them). ``buffers_only``: parameters stay.
    """
    saved, memo = [], {}
    try:
        for module in gm.modules():
            if hasattr(module, "_flat_weights"):
                continue
            for store in (module._buffers,) if buffers_only else (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if isinstance(t, torch.Tensor):
                        saved.append((store, name, t))
                        if id(t) not in memo:
                            memo[id(t)] = convert(t)
                        store[name] = memo[id(t)]
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def _device_of(gm: fx.GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def _fake(mode: FakeTensorMode, x, device: torch.device):
    if _is_shape(x):
        x = torch.empty(tuple(x), device="meta")
    if isinstance(x, torch.Tensor):
        if device.type == "meta" and x.device.type != "meta":
            x = x.to("meta")
        if x.device.type == "meta" and device.type != "meta":
            x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return mode.from_tensor(x, static_shapes=True)
    return x


def _failing_node(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and "val" not in node.meta:
            return node
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
