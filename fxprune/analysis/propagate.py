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
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxprune.errors import ShapeError, describe_node


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
    if _propagate_on_meta(gm, example_inputs):
        return
    device = _device_of(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = tuple(_fake(mode, x, device) for x in example_inputs)
    try:
        with _swapped_tensors(gm, lambda t: mode.from_tensor(t, static_shapes=True)):
            _MutableArgsProp(gm, mode).propagate(*fakes)
    except Exception as exc:  # report the node, not FakeTensorProp's internals
        node = _failing_node(gm)
        where = describe_node(node) if node is not None else "the graph"
        raise ShapeError(f"shape propagation failed at {where}: {type(exc).__name__}: {_first_line(exc)}") from exc


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
def _swapped_tensors(gm: fx.GraphModule, convert):
    """Every parameter and buffer replaced by ``convert(tensor)`` while propagating, then the originals put back.

    Propagating over meta or fake parameters never touches the real ones (a train-mode
    BatchNorm bumps only the stand-in's ``num_batches_tracked``). With FakeTensorMode,
    fake parameters also let it hit its dispatch cache instead of converting real ones
    on every op (and rerunning, e.g., the batch-norm decomposition): ~1.5x faster.
    Tied tensors stay tied (one stand-in per tensor). RNN modules keep theirs: they
    cache their weights in a list (the meta path does not run on them).
    """
    saved, memo = [], {}
    try:
        for module in gm.modules():
            if hasattr(module, "_flat_weights"):
                continue
            for store in (module._parameters, module._buffers):
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
