"""Capture: model -> torch.fx.GraphModule: ``symbolic_trace`` first, ``torch.export`` when it fails.

Hugging Face ``PreTrainedModel``s go straight to ``torch.export.export(model,
args, kwargs, strict=False)`` with ``use_cache=False``; the exported graph is
made of aten ops whose ``get_attr`` targets are the original parameter names.
Any other model is traced symbolically; if that fails and example inputs are
given, capture falls back to ``torch.export`` with a one-line note.

Example::

    >>> gm = capture(torchvision.models.resnet18())
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["stack_trace"]  # doctest: +SKIP
    'File ".../resnet.py", line 268, in _forward_impl\\n    x = self.conv1(x)'

A model symbolic tracing cannot handle (data-dependent control flow, ...)
raises :class:`CaptureError` with the failing source line and a pointer to
``torch.export`` capture.

Details. Symbolic tracing records stack traces, and a chunk/split of a traced tensor is iterated statically. Export
runs with ``strict=False`` and ``use_cache=False``, with ``Dim.AUTO`` on the input dimensions that vary in use
(``analysis/dynamic.py``: the batch, a token input's sequence, raw audio's samples; not an image's height and width
nor a spectrogram's frames unless the caller's ``dynamic_shapes=`` asks), one spec per keyword for a
``forward(**kwargs)``. An example of size 1 on such a dimension is repeated to 2 for export (which specialises sizes
0 and 1) and the graph is then propagated at the caller's sizes; every export gets fresh tensor objects (export
leaves dynamic-dimension marks on its inputs).

The dynamic export runs under a CPU budget (``capture_budget``: 4 s + 0.1 s per leaf module, checked by a global
forward pre-hook at each module call); past it, capture tries once more with only the batch symbolic, then a static
export. A dimension meant to vary that ends static (export failed, ran past the budget, or fixed it because the
forward computes with it) gives one warning naming the input and dimension, is recorded in
``gm.meta["fxprune_input_shapes"]`` and ``gm.meta["fxprune_static_shapes"]`` (why), which the pruned graph keeps,
and gets a check at the graph's entry (``dynamic.expect_size`` nodes after the placeholders) that refuses another
size with a ``ShapeError`` naming the size the graph was captured for. Where the graph is only analysed or counted
(in-place Hugging Face pruning without calibration, ``fxprune.count``) static sizes pass without a word. A traced
graph's varying dimensions are recorded too (``dynamic.record_traced``), none static yet.

Example inputs may be a tuple, a dict (keyword arguments) or ``()`` plus ``kwargs``; a traced graph's placeholders
are filled by name, then from their defaults. A model whose weights are on the meta device is exported with meta
inputs (the FakeTensor of torch 2.11 and earlier refuses to mix meta and CPU). Export's grad-mode and autocast
regions (``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` over a submodule: LLaMA's ``@torch.no_grad()``
rotary embedding in transformers 5.17) are inlined, as symbolic_trace records no modes either, so that rules see
their ops; unused constant kwargs (``use_cache``) are dropped by their position in the input spec, not by
placeholder name. Hugging Face mixture-of-experts blocks whose config asks for ``eager`` experts (a data-dependent
loop over the experts some token picked, refused by export) are exported with ``grouped_mm`` experts, the same
function in fixed ops, and the config is put back (``analysis/experts_capture.py``).

Tracing and each export run inside ``attributes_restored(model)``: a forward that caches on ``self`` (ultralytics'
Detect: ``self.anchors``, ``self.strides``, ``self.shape`` on its first call) would leave FakeTensors or Proxies on
the caller's model; added attributes are removed, replaced ones and the parameter/buffer/submodule tables put back.
A GraphModule gets a fresh graph over the same modules (its mode regions inlined too), so the caller's graph is
never edited. ``fx.GraphModule`` rebuilds the root and every container on the way to a called module as a plain
``nn.Module``: ``keep_user_attributes`` copies the public attributes the user set on them (root ones also into
``gm.meta["_user_preserved_attributes"]``, which torch puts back after the deepcopy rewrite makes). Models
dispatched by accelerate (``device_map=...``, its hooks on every block) are captured through the hooks (torch >=
2.8); a model with offloaded weights (``cpu``/``disk`` offload: meta placeholders) is a ``CaptureError`` naming the
modules and pointing to ``prune_checkpoint`` (``offloaded_modules``).
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import time
import traceback
import warnings

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import tree_leaves, tree_map, tree_structure, tree_unflatten

from fxprune.analysis import dynamic as dyn
from fxprune.analysis.experts_capture import grouped_experts
from fxprune.errors import CaptureError, ShapeError
from fxprune.modules import PrunedMultiheadAttention

# torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY: root attributes a GraphModule's deepcopy puts back
PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
EXPORTED = "export"  # value of gm.meta["fxprune_capture"] for graphs captured with torch.export


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        """A pruned MultiheadAttention stays one call, as its parent class does (decompose reads it)."""
        return isinstance(m, PrunedMultiheadAttention) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj):
        """``list(x.chunk(2, 1))`` (YOLO's C2f): the piece count is in the call, so iterate it statically."""
        count = _static_length(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])


class _Proxy(fx.Proxy):
    def __len__(self) -> int:
        count = _static_length(self.node)
        return count if count is not None else super().__len__()


def _static_length(node: fx.Node) -> int | None:
    """Number of results of a chunk/split call whose count does not depend on shapes."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = list(node.args[1:]) + list(node.kwargs.values())
    if name == "chunk" and args and isinstance(args[0], int):
        return args[0]
    if name in ("split", "split_with_sizes") and args and isinstance(args[0], (list, tuple)):
        return len(args[0])
    return None


def capture(model: torch.nn.Module, example_inputs=None, kwargs=None, dynamic: bool = True,
            dynamic_shapes=None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule; a GraphModule is returned as it is.

    An exported graph keeps the input dimensions that vary in use symbolic (batch, a token input's
    sequence: :mod:`fxprune.analysis.dynamic`), or those of ``dynamic_shapes`` (``torch.export``'s format) when
    given. ``dynamic=False`` exports with the example's static sizes: half the export time, for
    graphs that are only analysed or counted and never handed to the user (in-place
    Hugging Face pruning, ``fxprune.count``). Symbolically traced graphs take any size either way.
    """
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxprune needs an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    offloaded = offloaded_modules(model)
    if offloaded:
        raise CaptureError(
            f"{type(model).__name__}: {len(offloaded)} module(s) have their weights offloaded by accelerate "
            f"(device_map with 'cpu'/'disk' offload; e.g. {offloaded[0]!r}), so their tensors are placeholders on the "
            f"meta device that a graph capture cannot read. Prune the checkpoint folder with "
            f"fxprune.prune_checkpoint(src_dir, out_dir, ...) instead, or load the model without offloading")
    if is_hf_model(model):
        if example_inputs is None:
            raise CaptureError(f"{type(model).__name__} is captured with torch.export, which needs example_inputs")
        kwargs = dict(kwargs or {})
        if kwargs.pop("use_cache", False):
            warnings.warn("fxprune: use_cache=True ignored for capture: a cache object is not a graph output; "
                          "the model keeps its cache when pruned in place", stacklevel=3)
        kwargs["use_cache"] = False  # last, so that the unused placeholder can be dropped
        return export_capture(model, example_inputs, kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    tracer = _Tracer()
    try:
        with attributes_restored(model):
            graph = tracer.trace(model)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # any tracing failure becomes one clear error, or an export fallback
        explanation = _explain(model, exc)
        if example_inputs is None:
            raise CaptureError(explanation) from exc
        warnings.warn(f"fxprune: symbolic_trace failed ({type(exc).__name__}); captured with torch.export instead",
                      stacklevel=3)
        return export_capture(model, example_inputs, kwargs, explanation, dynamic=dynamic,
                              dynamic_shapes=dynamic_shapes)
    keep_user_attributes(model, gm)
    return gm


def offloaded_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose weights accelerate offloads (loaded onto the device only while they run).

    Example: ``from_pretrained(path, device_map={"model.layers.1": "disk", ...})`` gives ``["model.layers.1", ...]``;
    a model on one device, or spread over several devices without offloading, gives ``[]``.
    """
    names = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])  # accelerate's SequentialHook
        if any(getattr(h, "offload", False) for h in hooks):
            names.append(name)
    return names


@contextlib.contextmanager
def attributes_restored(model: torch.nn.Module):
    """Every module's attributes put back as they were once a capture has run ``model``'s forward.

    A forward may cache what it computes on ``self``: ultralytics' Detect head sets ``self.anchors``,
    ``self.strides`` and ``self.shape`` on its first call. Run by ``torch.export`` those are FakeTensors (by
    symbolic_trace, Proxies), left on the caller's model: its next real call reuses them and fails, or the next
    capture meets another trace's fakes. Attributes added are removed, replaced ones put back, and the
    parameter, buffer and submodule tables restored (the tensors themselves: a capture does not write into them).

    Example::

        >>> with attributes_restored(yolo):
        ...     torch.export.export(yolo, (x,), strict=False)       # doctest: +SKIP
        >>> hasattr(yolo.model[-1], "anchors")                       # doctest: +SKIP
        False
    """
    tables = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(vars(m)), {t: dict(vars(m)[t]) for t in tables if t in vars(m)}) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            current = vars(module)
            for key in [k for k in current if k not in attributes]:
                del current[key]
            for key, value in attributes.items():
                if current.get(key, current) is not value:
                    current[key] = value
            for table, entries in contents.items():
                now = current[table]
                if now.keys() != entries.keys() or any(now[k] is not v for k, v in entries.items()):
                    now.clear()
                    now.update(entries)


def keep_user_attributes(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Put the attributes a user set on the model and its containers (``model.layer1.tag = "x"``) on ``gm``.

    ``fx.GraphModule`` keeps the called modules themselves, but rebuilds the root and every module on the way to
    them (``layer1``, a Sequential) as a plain ``nn.Module`` that has none of their attributes. Public
    attributes are copied where the rebuilt module lacks them; the GraphModule's own (``graph``, ``code``) win.
    """
    rebuilt = dict(gm.named_modules())
    for name, module in model.named_modules():
        target = rebuilt.get(name)
        if target is None or target is module:
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or key in vars(target) or hasattr(type(target), key):
                continue
            setattr(target, key, value)
            if target is gm:  # GraphModule's deepcopy (rewrite's copy) rebuilds the root: torch keeps these
                gm.meta.setdefault(PRESERVED, {})[key] = value


def export_capture(model: torch.nn.Module, example_inputs, kwargs=None, trace_error: str = "",
                   dynamic: bool = True, dynamic_shapes=None) -> fx.GraphModule:
    """``torch.export.export(model, args, kwargs, strict=False).module()``, or a CaptureError quoting export.

    With ``dynamic`` the input dimensions that vary in use (:mod:`fxprune.analysis.dynamic`: batch, a token
    input's sequence, raw audio's samples; or the caller's ``dynamic_shapes``) stay symbolic: an example of size 1
    there is repeated to size 2 for export (which specialises sizes 0 and 1; the graph is then propagated at the
    caller's sizes), and the export runs under a CPU budget (:func:`capture_budget`). Where the dynamic export
    fails or runs past the budget, or fixes a dimension meant to vary, the graph is static there: one warning
    names the dimensions, ``gm.meta["fxprune_input_shapes"]`` lists them with the reason, and a check at the
    graph's entry (:func:`fxprune.analysis.dynamic.expect_size`) refuses other sizes with that reason.
    ``dynamic=False`` exports the example's sizes as asked (a graph only analysed or counted), without a word.
    """
    args, kwargs = tuple(example_inputs), dict(kwargs or {})
    if _on_meta_device(model):  # FakeTensor of torch 2.11 and earlier refuses meta weights with CPU inputs
        args, kwargs = tree_map(_to_meta, (args, kwargs))
    names = _argument_names(model, args, kwargs)
    named = dict(zip(names, (*args, *kwargs.values())))
    if dynamic_shapes is not None:
        dims = dyn.requested_dims(named, dynamic_shapes)
    else:
        dims = dyn.varying_dims(named, getattr(model, "main_input_name", None) if is_hf_model(model) else None)
    start, why, grown = time.process_time(), "", []
    try:
        with grouped_experts(model):  # transformers' eager experts loop over data; grouped_mm does not
            program = None
            if dynamic and dims:
                program, why, grown = _dynamic_export(model, args, kwargs, names, named, dims, dynamic_shapes)
            gm = _module(program) if program is not None else None
            if gm is not None and grown:  # a dimension repeated to 2 that export fixed would take size 2 only
                fixed = [r for r in dyn.placeholder_dims(gm, grown, _placeholder_names(gm, names, len(args)))
                         if r["static"]]
                if fixed:
                    gm, why = None, (f"torch.export fixed {dyn.describe(fixed)} of the example repeated to "
                                     "size 2 (export specialises sizes 0 and 1), so the graph is captured at the "
                                     "example's size")
            if gm is None:
                with attributes_restored(model):
                    gm = _module(torch.export.export(model, *_fresh(args, kwargs), strict=False))
    except Exception as exc:  # export's own message is the useful part
        message = str(exc).strip().splitlines()
        raise CaptureError(
            (trace_error + "\n" if trace_error else "")
            + f"torch.export could not capture {type(model).__name__}{' either' if trace_error else ''}: "
            + f"{type(exc).__name__}: "
            + (message[0] if message else "")
        ) from exc
    inline_mode_regions(gm)
    gm.meta["fxprune_capture"] = EXPORTED
    records = dyn.placeholder_dims(gm, dims, _placeholder_names(gm, names, len(args)))
    static = [r for r in records if r["static"]]
    if not dynamic:
        shapes, why = "static", "a static export was asked for: the graph is only analysed or counted"
    elif static:
        why = why or "torch.export fixed them: the model's forward computes with these sizes as constants"
        shapes = "static" if len(static) == len(records) else "partly static"
        warnings.warn(f"fxprune: {type(model).__name__} captured with static shapes on {dyn.describe(static)}: "
                      f"the graph takes only these sizes and refuses others at its entry ({why})", stacklevel=4)
        gm.meta["fxprune_static_shapes"] = why
        dyn.add_size_checks(gm, static, why)
    else:
        shapes = "dynamic"
    dyn.record(gm, "torch.export", why, records, shapes=shapes, repeated=[d.describe() for d in grown],
               budget_s=round(capture_budget(model), 1), cpu_s=round(time.process_time() - start, 3))
    gm.meta["fxprune_kwargs"] = _drop_constant_kwargs(gm, example_inputs, dict(kwargs or {}))
    return gm


def _fresh(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """New tensor objects over the same data for one export: export marks the dynamic dimensions on the input
    tensors it is given (``_dynamo_dynamic_indices``) and leaves the marks there (for good after an interrupted
    export), and a later export of the same tensors would treat them dynamic (a static export of the tiny Swin
    took 60 s instead of 0.3 s); the caller's tensors keep no marks either."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, (args, kwargs))


def _module(program) -> fx.GraphModule:
    return program.module(check_guards=False) if "check_guards" in _parameters(program.module) else program.module()


def capture_budget(model: torch.nn.Module) -> float:
    """CPU seconds a dynamic export may take before capture falls back to a static one: 4 s plus 0.1 s per leaf
    module. A dynamic export normally takes 1.5 to 3 times a static one, about 0.02 s per leaf module (a
    22-layer 1B LLaMA: 5.6 s, its budget 26 s); Hugging Face Swin with symbolic image sizes took 65 s for its 32
    leaf modules (budget 7 s)."""
    leaves = sum(1 for m in model.modules() if next(m.children(), None) is None)
    return 4.0 + 0.1 * leaves


def _dynamic_export(model, args, kwargs, names, named, dims, dynamic_shapes):
    """``(program or None, why it is None or partly static, the dims repeated to size 2)``: export with ``dims``
    symbolic; where that runs past the CPU budget, again with only the batch dimensions symbolic."""
    wide, grown = dyn.widened(named, dims)
    w_args, w_kwargs = tuple(wide[n] for n in names[:len(args)]), {n: wide[n] for n in names[len(args):]}
    by_name = dyn.by_input(named, dynamic_shapes) if dynamic_shapes is not None else dyn.export_spec(wide, dims)
    batch = [d for d in dims if d.axis == 0 and d.role in (dyn.BATCH, dyn.REQUESTED)]
    attempts = [(by_name, "")]
    if len(batch) < len(dims) and batch:
        attempts.append((dyn.export_spec(wide, batch, only=True), "; captured with the batch dimension symbolic only"))
    why = ""
    for by_name, fallback in attempts:
        try:
            spec = _by_signature(model, w_args, w_kwargs, by_name)
            with attributes_restored(model), dyn.cpu_budget(capture_budget(model)):
                program = torch.export.export(model, *_fresh(w_args, w_kwargs), strict=False, dynamic_shapes=spec)
            return program, why + fallback, grown
        except dyn.OverBudget as exc:  # symbolic reasoning is what costs: a cheaper capture may do
            why = why or f"the dynamic export ran {exc} (symbolic shape reasoning)"
        except Exception as exc:  # a static graph is still a good graph, but the caller must know
            lines = str(exc).strip().splitlines()
            return None, why or f"dynamic export failed: {type(exc).__name__}: {lines[0] if lines else ''}", grown
    return None, why + "; the static export is cheaper", grown


def _argument_names(model, args: tuple, kwargs: dict) -> list[str]:
    """A name for every top-level input: forward's parameter name for a positional one (``args[i]`` past them,
    into ``*args``), the keyword for a keyword one."""
    positional = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return [positional[i] if i < len(positional) else f"args[{i}]" for i in range(len(args))] + list(kwargs)


def _leaf_positions(in_spec, names: list[str], n_args: int) -> dict[str, int]:
    """``{input name: index of its flat leaf}`` for top-level inputs that are one leaf (tensors)."""
    args, kwargs = tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
    out = {name: pos for name, pos in zip(names[:n_args], args) if isinstance(pos, int)}
    out.update({k: v for k, v in kwargs.items() if isinstance(v, int)})
    return out


def _placeholder_names(gm: fx.GraphModule, names: list[str], n_args: int) -> dict[str, str]:
    """``{input name: placeholder name}`` of a graph ``torch.export`` just made (before constants are dropped)."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {name: placeholders[pos].name for name, pos in _leaf_positions(codegen.pytree_info.in_spec, names,
                                                                          n_args).items()
            if pos < len(placeholders)}


def _mode_wrappers() -> set:
    """The higher-order ops with which ``torch.export`` wraps a region run under another grad or autocast mode."""
    names = ("wrap_with_set_grad_enabled", "wrap_with_autocast")
    return {getattr(torch.ops.higher_order, name) for name in names if hasattr(torch.ops.higher_order, name)}


def inline_mode_regions(gm: fx.GraphModule) -> bool:
    """Inline the submodules of grad-mode and autocast regions into ``gm``'s graph; True if any was inlined.

    ``torch.export`` puts a region that runs under another grad mode (``@torch.no_grad()`` on
    LLaMA's rotary embedding in transformers 5.17, while the caller has grad enabled) or
    another autocast state in a submodule called through ``wrap_with_set_grad_enabled`` /
    ``wrap_with_autocast``. Its ops are ordinary aten ops: inlined, every rule sees them and the
    graph is flat, as symbolic_trace's graphs are (which do not record grad or autocast modes either).
    """
    wrappers = _mode_wrappers()
    inlined = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in wrappers:
            continue
        at = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr")
        holder = node.args[at]
        body = gm.get_submodule(holder.target)
        inline_mode_regions(body)  # nested regions first
        env = dict(zip(body.graph.find_nodes(op="placeholder"), node.args[at + 1:]))
        with gm.graph.inserting_before(node):
            for attr in body.graph.find_nodes(op="get_attr"):  # constants of the region move to gm
                name = _free_attribute(gm, attr.target.replace(".", "_"))
                setattr(gm, name, operator.attrgetter(attr.target)(body))
                env[attr] = gm.graph.get_attr(name)
            outputs = gm.graph.graph_copy(body.graph, env)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise CaptureError(f"{node.target} result used whole by {user.format_node()}")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            gm.delete_submodule(holder.target)
        inlined = True
    if inlined:
        gm.graph.lint()
        gm.recompile()
    return inlined


def _free_attribute(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _on_meta_device(model: torch.nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _drop_constant_kwargs(gm: fx.GraphModule, example_inputs, kwargs: dict) -> dict:
    """Remove unused constant placeholders (``use_cache=False``) so that ``pruned(ids)`` just works.

    Returns the kwargs the graph still takes.
    """
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return kwargs
    # placeholders are matched through the input spec, not by name: torch < 2.7 names a keyword
    # that reached forward through ``**kwargs`` "kwargs_use_cache"
    spec = codegen.pytree_info.in_spec
    _, positions = tree_unflatten(list(range(spec.num_leaves)), spec)
    placeholders = gm.graph.find_nodes(op="placeholder")
    kept = dict(kwargs)
    for key, position in positions.items():
        if isinstance(position, int) and not isinstance(kwargs[key], torch.Tensor) and not placeholders[position].users:
            gm.graph.erase_node(placeholders[position])
            del kept[key]
    if kept == kwargs:
        return kwargs
    names = [name for name in codegen.pytree_info.orig_args if name not in kwargs.keys() - kept.keys()]
    in_spec = tree_structure((tuple(example_inputs), kept))
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, codegen.pytree_info.out_spec))
    gm.recompile()
    return kept


def _by_signature(model: torch.nn.Module, args: tuple, kwargs: dict, by_name: dict) -> dict:
    """Export's ``dynamic_shapes`` for ``forward(*args, **kwargs)`` from ``{input name: spec}`` (the names of
    :func:`_argument_names`): keyed by forward's parameter names, one spec per keyword for a ``forward(**kwargs)``,
    a tuple for ``*args``."""
    signature = inspect.signature(model.forward)
    out = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:  # forward(**kwargs): a spec per keyword, as export wants
            out[name] = {k: by_name.get(k) for k in value}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            first = len(args) - len(value)
            out[name] = tuple(by_name.get(f"args[{first + i}]") for i in range(len(value)))
        else:
            out[name] = by_name.get(name)
    return out


def split_inputs(example_inputs, kwargs=None) -> tuple:
    """``(args, kwargs)`` of a call: a dict of example inputs is keyword arguments, a lone tensor one argument."""
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(kwargs or {})}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is None and kwargs:
        example_inputs = ()
    return example_inputs, kwargs


def flat_inputs(gm: fx.GraphModule, example_inputs, kwargs=None) -> tuple | None:
    """The values of the graph's placeholders: exported graphs take ``(args, kwargs)`` flattened; a traced graph's
    placeholders are forward's parameters, filled from ``kwargs`` by name, else from their defaults."""
    example_inputs, kwargs = split_inputs(example_inputs, kwargs)
    if example_inputs is None:
        return None
    if isinstance(gm.graph._codegen, _PyTreeCodeGen):
        kwargs = gm.meta.get("fxprune_kwargs", kwargs or {})  # the kwargs the graph was exported with
        return tuple(tree_leaves((tuple(example_inputs), dict(kwargs))))
    if not kwargs:
        return tuple(example_inputs)
    placeholders = gm.graph.find_nodes(op="placeholder")
    names = [n.target.lstrip("*") for n in placeholders]
    unknown = [k for k in kwargs if k not in names[len(example_inputs):]]
    if unknown:
        raise ShapeError(f"{type(gm).__name__} takes no keyword argument {unknown[0]!r} after "
                         f"{len(example_inputs)} positional ones (its inputs: {', '.join(names)})")
    values = list(example_inputs)
    for node, name in zip(placeholders[len(values):], names[len(values):]):
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # a parameter with a default
            values.append(node.args[0])
        else:
            raise ShapeError(f"no example input for {type(gm).__name__}'s input {name!r}: pass it in "
                             "example_inputs or kwargs")
    return tuple(values)


def module_names(gm: fx.GraphModule, model=None) -> dict[int, str]:
    """``{id(module): name}`` for the caller's ``model`` and the captured ``gm``: a torch.export capture holds
    copies of the modules under the same names, so the caller's module objects are found by their names."""
    names = {id(m): name for name, m in gm.named_modules()}
    if isinstance(model, torch.nn.Module) and model is not gm:
        names.update({id(m): name for name, m in model.named_modules()})
    return names


def name_of_key(key, names: dict, what: str, wrong_type: str) -> str:
    """The name a module-or-name key of ``ignore`` / ``ratios`` stands for: a module of the model is found by
    identity in ``names`` (:func:`module_names`), a string is the name itself; anything else raises
    ``TypeError(wrong_type + its type's name)``."""
    if isinstance(key, torch.nn.Module):
        if id(key) not in names:
            raise ValueError(f"{what}: module {type(key).__name__} is not part of the model")
        return names[id(key)]
    if isinstance(key, str):
        return key
    raise TypeError(f"{wrong_type}{type(key).__name__}")


def is_hf_model(model) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _is_library_file(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "torch" in parts or filename == __file__  # torch's frames and _Tracer's


def _explain(model: torch.nn.Module, exc: Exception) -> str:
    # frames, not traceback.extract_tb: the column positions of a frame without a line number (the forward
    # of a patched module under torch < 2.7) stop Python 3.11's extract_tb with StopIteration
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(exc.__traceback__)
              if line is not None and not _is_library_file(frame.f_code.co_filename)]
    where = ""
    if frames:
        filename, line = frames[-1]
        where = f" at {filename}:{line}: {linecache.getline(filename, line).strip()}"
    return (
        f"torch.fx.symbolic_trace could not trace {type(model).__name__}{where}\n"
        f"  {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
        "Symbolic tracing cannot follow data-dependent control flow. Capture the model with "
        "torch.export.export(model, args, strict=False).module() and pass that GraphModule to fxprune."
    )
