"""Save a (pruned) GraphModule to a folder and load it back, without pickle.

A folder written by :func:`save` holds:

- ``model.json`` — the fx graph (every node's op, name, target, args and kwargs;
  callables by qualified name), the module tree (each module's class, its
  plain attributes such as ``in_channels``, ``stride`` or ``eps``, and the
  names of its parameters and buffers), and the ``fxprune_*`` entries of
  ``gm.meta``;
- ``weights.safetensors`` — every parameter, buffer and tensor attribute,
  once (tied weights are stored once and tied again on load);
- ``code.py`` — ``gm.code``, for people to read (loading does not use it);
- ``plan.json`` — the pruning plan, when the module carries one
  (``gm.meta["fxprune_plan"]``, set by :func:`fxprune.prune`).

A module is rebuilt the way pickle would rebuild it, but from JSON: its class is
imported, an instance is made without calling its constructor, and its
recorded attributes, parameters and buffers are put back. So any module whose
attributes are plain values (numbers, strings, tuples, dtypes, callables
defined at module level, its own tensors) round-trips, whatever its
constructor's signature. Symbolically traced and ``torch.export``-ed graphs are
both supported (an exported module comes back as a plain ``GraphModule``: the
input-constraint checks that ``ExportedProgram.module()`` installs as hooks are
not saved).

``torch.save`` of a module whose graph torch cannot pickle back goes through :func:`save` too
(:func:`picklable`): torch pickles a GraphModule as its Python code and traces that code again on load, and an
exported graph (what :func:`fxprune.prune` returns for a Hugging Face model, not in place) does not survive it:
its tracer class (``_ModuleStackTracer``) cannot be built without arguments, so ``torch.load`` failed on a file
``torch.save`` wrote without complaint; and traced again, its code returns a ``dict`` where the model returned its
own output class (the pytree output spec is lost). Such a module gets a class whose ``__reduce__`` carries the
files :func:`save` writes, as bytes; unpickling loads them back (graph, output class, tensors and the
``fxprune_*`` meta, the plan included, which torch's own pickle drops). Copies keep the class; traced graphs keep
torch's own pickling::

    >>> pruned = fxprune.prune(BertModel(config), 0.3, example_inputs=(ids,))   # an exported graph
    >>> torch.save(pruned, "pruned.pt")
    >>> type(torch.load("pruned.pt", weights_only=False)(ids)).__name__
    'BaseModelOutputWithPoolingAndCrossAttentions'

Loading imports the classes and functions that ``model.json`` names, and the
loaded module runs the graph it describes: load only folders you trust, as you
would only run code you trust.

Example::

    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5, example_inputs=(x,))
    >>> fxprune.save(pruned, "resnet18-pruned")
    >>> again = fxprune.load("resnet18-pruned")
    >>> torch.equal(again(x), pruned(x))
    True

Details. Nodes are saved with their ``stack_trace`` and ``is_wrapped``, and exported graphs with their pytree in/out
specs; a module's recorded attributes are its ``__dict__`` minus ``nn.Module`` internals, with parameter/buffer
names and aliases. Loaded tensors are copied to 64-byte-aligned memory, as the originals were: safetensors packs
them at 8-byte offsets, and BLAS kernels may order sums by alignment. A module is rebuilt with ``cls.__new__`` + its
recorded attributes, then the class's own ``__setstate__`` (RNN flat weights); the root is a fresh ``GraphModule``
whose ``graph`` is set last.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
import torch.utils._pytree as pytree
from torch.utils._pytree import treespec_dumps, treespec_loads

from fxprune.analysis.capture import PRESERVED
from fxprune.io.jsonvalue import SerializationError, decode_with, encode, import_object, qualified_name

FORMAT = "fxprune-graphmodule"
VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
CODE_FILE = "code.py"
PLAN_FILE = "plan.json"
PLAN_META = "fxprune_plan"

# What nn.Module.__init__ sets up; saved by the parameter/buffer/children lists instead of as attributes.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_HOOKS = tuple(k for k in _MODULE_INTERNALS if "hook" in k)
# Node metadata worth keeping: source lines for error messages; fx's flag that makes the generated
# code re-wrap torch.fx.wrap'ed functions, so that the loaded module can be traced again.
_NODE_META = ("stack_trace", "is_wrapped")


def save(gm: fx.GraphModule, directory) -> Path:
    """Write ``gm`` to ``directory`` (created if needed) as JSON + safetensors; returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"fxprune.save takes a torch.fx.GraphModule (what fxprune.prune returns), "
                        f"got {type(gm).__name__}")
    store = _TensorStore()
    modules = _module_entries(gm, store)
    spec = {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
            "modules": modules, "tensors": store.entries, "meta": _encode_meta(gm.meta)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(store.tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / MODEL_FILE).write_text(json.dumps(spec, indent=1))
    (directory / CODE_FILE).write_text(gm.code)
    plan = gm.meta.get(PLAN_META)
    if plan is not None:
        plan.save(directory / PLAN_FILE)
    return directory


def load(directory, device="cpu") -> fx.GraphModule:
    """Rebuild the GraphModule :func:`save` wrote to ``directory``; tensors go to ``device``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise SerializationError(f"{directory} is not a folder written by fxprune.save (no {MODEL_FILE})")
    spec = json.loads((directory / MODEL_FILE).read_text())
    if spec.get("format") != FORMAT or spec.get("version", 0) > VERSION:
        raise SerializationError(f"{directory / MODEL_FILE} is not an fxprune model of version <= {VERSION}")
    tensors = _materialize(spec["tensors"], load_file(str(directory / WEIGHTS_FILE), device=str(device)))
    root = _build_modules(spec["modules"], tensors)
    root.meta.update(_decode_meta(spec.get("meta", {})))
    for key, value in root.meta.get(PRESERVED, {}).items():  # attributes the user set on the model's root
        setattr(root, key, value)
    if (directory / PLAN_FILE).is_file():
        from fxprune.io.plans import PruningPlan

        root.meta[PLAN_META] = PruningPlan.load(directory / PLAN_FILE)
    return picklable(root)


# -- torch.save / pickle through save -------------------------------------

class PickledThroughSave(fx.GraphModule):
    """A GraphModule pickled as the files :func:`save` writes (see :func:`picklable`)."""

    def __reduce__(self):
        with tempfile.TemporaryDirectory() as folder:
            save(self, folder)
            files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
        return _unpickle, (files,)


def _unpickle(files: dict) -> fx.GraphModule:
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return load(folder)


def needs_own_pickling(gm: fx.GraphModule) -> bool:
    """Whether torch's pickling would lose ``gm``: its code takes and returns pytrees (an exported graph's in/out
    specs), or its tracer class cannot be built without arguments."""
    return isinstance(gm.graph._codegen, _PyTreeCodeGen) or not _builds_without_arguments(gm._tracer_cls)


def picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, pickled through :func:`save` from now on where torch's pickling would lose it
    (:func:`needs_own_pickling`); only its class changes.

    Example::

        >>> gm = picklable(torch.export.export(model, (x,)).module())
        >>> type(gm).__mro__[1].__name__
        'PickledThroughSave'
    """
    if needs_own_pickling(gm) and not isinstance(gm, PickledThroughSave):
        # GraphModule keeps each instance's forward on a class of its own: a new one, then the forward again
        gm.__class__ = type("GraphModuleImpl", (PickledThroughSave,), {})
        gm.recompile()
    return gm


def _builds_without_arguments(tracer_cls) -> bool:
    if tracer_cls is None:
        return True
    try:
        tracer_cls()
    except TypeError:
        return False
    return True


# -- saving ---------------------------------------------------------------

class _TensorStore:
    """Every distinct tensor once, under the first name it was seen by."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}
        self._names: dict[int, str] = {}
        self._storages: set[tuple] = set()

    def add(self, name: str, tensor: torch.Tensor, kind: str, **info) -> str:
        if id(tensor) in self._names:
            return self._names[id(tensor)]
        if tensor.device.type == "meta":
            raise SerializationError(f"{name} is on the meta device and has no values to save")
        data = tensor.detach().contiguous()
        storage = (data.device.type, data.untyped_storage().data_ptr())
        if storage in self._storages or data.untyped_storage().nbytes() != data.numel() * data.element_size():
            data = data.clone()  # safetensors refuses tensors sharing memory (views of one weight)
        self._storages.add((data.device.type, data.untyped_storage().data_ptr()))
        self._names[id(tensor)] = name
        self.tensors[name] = data.cpu() if data.device.type != "cpu" else data
        self.entries[name] = {"kind": kind, **info}
        return name


def _module_entries(gm: fx.GraphModule, store: _TensorStore) -> list[dict]:
    named = list(gm.named_modules(remove_duplicate=False))
    paths = {}
    for path, module in named:  # tensors first, so that attributes can refer to them by name
        paths.setdefault(id(module), path)
        if paths[id(module)] != path:
            continue
        prefix = path + "." if path else ""
        for name, p in module._parameters.items():
            if p is not None:
                store.add(prefix + name, p, "parameter", requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                store.add(prefix + name, b, "buffer")
    entries = []
    for path, module in named:
        if paths[id(module)] != path:
            entries.append({"path": path, "alias_of": paths[id(module)]})
            continue
        entries.append(_module_entry(path, module, store, is_root=module is gm))
    return entries


def _module_entry(path: str, module: nn.Module, store: _TensorStore, is_root: bool) -> dict:
    where = path or "the root module"
    prefix = path + "." if path else ""
    entry = {
        "path": path,
        "training": module.training,
        "parameters": [[n, None if p is None else store.add(prefix + n, p, "parameter")]
                       for n, p in module._parameters.items()],
        "buffers": [[n, None if b is None else store.add(prefix + n, b, "buffer"),
                     n not in module._non_persistent_buffers_set] for n, b in module._buffers.items()],
    }
    if isinstance(module, fx.GraphModule):
        entry["graph"] = _graph_to_json(module.graph, where)
        entry["class_name"] = type(module).__name__
        return entry
    if not is_root:
        hooked = [k for k in _HOOKS if isinstance(getattr(module, k, None), dict) and getattr(module, k)]
        if hooked:
            raise SerializationError(f"{where} ({type(module).__name__}) has hooks ({', '.join(hooked)}); "
                                     "they are Python callbacks and cannot be saved without pickle")
    entry["class"] = qualified_name(type(module), where)
    attrs = {}
    for name, value in module.__dict__.items():
        if name in _MODULE_INTERNALS or _is_cache(value):
            continue
        attrs[name] = encode(value, f"{where}.{name}",
                             lambda t, attr=name: store.add(prefix + attr, t, "attribute"))
    entry["attrs"] = attrs
    return entry


def _is_cache(value) -> bool:
    """Weak references (RNN's ``_flat_weight_refs``) are caches the class's __setstate__ rebuilds."""
    if isinstance(value, (list, tuple)) and value:
        return all(v is None or isinstance(v, weakref.ref) for v in value) and any(v is not None for v in value)
    return isinstance(value, weakref.ref)


def _graph_to_json(graph: fx.Graph, where: str) -> dict:
    nodes = []
    for node in graph.nodes:
        here = f"{where}: node {node.name!r}"
        target = encode(node.target, here) if node.op == "call_function" else node.target
        entry = {"name": node.name, "op": node.op, "target": target,
                 "args": encode(node.args, here), "kwargs": encode(dict(node.kwargs), here)}
        if node.type is not None:
            try:
                entry["type"] = encode(node.type, here)
            except SerializationError:
                pass  # a type annotation only decorates the generated code
        meta = {k: node.meta[k] for k in _NODE_META if node.meta.get(k)}
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        code = {"kind": "pytree", "orig_args": list(info.orig_args),
                "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
                "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    elif type(codegen) is fx.graph.CodeGen:
        code = {"kind": "python"}
    else:
        raise SerializationError(f"{where}: the graph uses code generator {type(codegen).__name__}, "
                                 "which fxprune.save does not know")
    return {"codegen": code, "nodes": nodes}


def _encode_meta(meta: dict) -> dict:
    out = {}
    for key, value in meta.items():
        if (key.startswith("fxprune_") and key != PLAN_META) or key == PRESERVED:
            try:
                out[key] = encode(value, f"gm.meta[{key!r}]")
            except SerializationError:
                continue  # e.g. tensor kwargs of an exported model: the graph itself does not need them
    return out


def _decode_meta(meta: dict) -> dict:
    return {k: decode_with(v, node=_no_nodes, tensor=_no_nodes) for k, v in meta.items()}


def _no_nodes(name):
    raise SerializationError(f"unexpected reference to {name!r} in saved metadata")


# -- loading --------------------------------------------------------------

_ALIGNMENT = 64  # bytes, as torch's CPU allocator aligns; safetensors packs tensors at 8-byte offsets


def _materialize(entries: dict, raw: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, info in entries.items():
        if name not in raw:
            raise SerializationError(f"{WEIGHTS_FILE} has no tensor {name!r}")
        t = raw[name]
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % _ALIGNMENT:
            t = t.clone()  # as the original was allocated: BLAS kernels may split sums by alignment (MKL on AMD)
        tensors[name] = nn.Parameter(t, requires_grad=info.get("requires_grad", True)) \
            if info["kind"] == "parameter" else t
    return tensors


def _build_modules(entries: list[dict], tensors: dict) -> fx.GraphModule:
    built: dict[str, nn.Module] = {}
    graphs, restored = [], []
    for entry in entries:
        path = entry["path"]
        if "alias_of" in entry:
            module = built[entry["alias_of"]]
        elif "graph" in entry:
            module = fx.GraphModule(nn.Module(), fx.Graph(), entry["class_name"])
            graphs.append((module, entry["graph"]))
        else:
            module = _new_module(entry, tensors)
            restored.append(module)
        if "alias_of" not in entry:
            module.training = entry["training"]
            for name, key in entry["parameters"]:
                module._parameters[name] = None if key is None else tensors[key]
            for name, key, persistent in entry["buffers"]:
                module._buffers[name] = None if key is None else tensors[key]
                if not persistent:
                    module._non_persistent_buffers_set.add(name)
        if path:
            parent, _, name = path.rpartition(".")
            built[parent]._modules[name] = module
        built[path] = module
    for module in restored:
        if type(module).__setstate__ is not nn.Module.__setstate__:
            module.__setstate__(dict(module.__dict__))  # rebuilds caches (RNN flat weights)
    for module, graph in graphs:
        module.graph = _graph_from_json(graph)
    return built[""]


def _new_module(entry: dict, tensors: dict) -> nn.Module:
    cls = import_object(entry["class"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SerializationError(f"{entry['class']} is not an nn.Module class")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, data in entry["attrs"].items():
        module.__dict__[name] = decode_with(data, node=_no_nodes, tensor=tensors.__getitem__)
    return module


def _graph_from_json(data: dict) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def value(d):
        return decode_with(d, node=env.__getitem__, tensor=_no_nodes)

    for entry in data["nodes"]:
        target = value(entry["target"]) if entry["op"] == "call_function" else entry["target"]
        node = graph.create_node(entry["op"], target, value(entry["args"]), value(entry["kwargs"]),
                                 name=entry["name"], type_expr=value(entry.get("type")))
        if node.name != entry["name"]:
            raise SerializationError(f"node {entry['name']!r} came back as {node.name!r}")
        node.meta.update(entry.get("meta", {}))
        env[node.name] = node
    code = data["codegen"]
    if code["kind"] == "pytree":
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
            code["orig_args"], _treespec(code["in_spec"]) if code["in_spec"] else None,
            _treespec(code["out_spec"]) if code["out_spec"] else None))
    graph.lint()
    return graph


def _treespec(spec: str):
    """The pytree spec ``treespec_dumps`` wrote, its node types imported first: a class registers itself with
    torch's pytree when its module is imported (a Hugging Face ``ModelOutput`` subclass does, under its dotted
    name), and a fresh process that loads a saved model has not imported it yet (transformers imports its output
    classes lazily), so ``treespec_loads`` alone failed there.

    Example::

        >>> from torch.utils._pytree import tree_structure, treespec_dumps
        >>> _treespec(treespec_dumps(tree_structure((1, {"a": 2})))) == tree_structure((1, {"a": 2}))
        True
    """
    registered = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE

    def walk(node):
        if isinstance(node, dict):
            name = node.get("type")
            if isinstance(name, str) and name not in registered:
                import_object(name)  # loading imports what model.json names, as for the classes of the modules
                if name not in registered:
                    raise SerializationError(f"the saved graph's inputs or outputs are a {name}, which importing "
                                             "it did not register with torch's pytree: register it "
                                             "(torch.utils._pytree.register_pytree_node, serialized_type_name="
                                             f"{name!r}) before loading")
            for child in node.get("children_spec", ()):
                walk(child)

    walk(json.loads(spec)[1])
    return treespec_loads(spec)


def is_saved_model(path) -> bool:
    """True for a folder written by :func:`save`."""
    return os.path.isfile(os.path.join(path, MODEL_FILE))
