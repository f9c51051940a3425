"""What a rule sees: tensors as lists of axes, and the relations it may state.

A rule gets a :class:`RuleContext` for one node. Tensors are :class:`TensorRef`;
indexing one gives the layout of that axis, which is what relations take::

    @register(torch.nn.Linear, torch.nn.functional.linear)
    def linear(r):
        a = r.bind(_linear_signature)          # module params bound like function args
        x, w, b, out = a["input"], a["weight"], a.get("bias"), r.out
        r.same(x[-1], w[1])                    # contraction axis
        r.same(out[-1], w[0])
        ...

Keys of tensors: ``("p", "layer.weight")`` for parameters, buffers and other
attributes (``get_attr``), ``("v", node_name, path)`` for activations, where
``path`` indexes into tuple outputs (``()`` for a plain tensor).

Binding. An aten op is bound by its schema's argument names, renamed by ``_SCHEMA_ALIASES`` (``self`` -> ``input``,
``mat2`` -> ``other`` for mm/bmm, ``batch1``/``batch2`` -> ``mat1``/``mat2`` for baddbmm); a rule argument without a
default that no schema name matches raises ``FxPruneError`` naming the node, op and line. ``r.param(name)`` and
``r.module_attr(name, ...)`` take dotted names (``"inner.weight"``), so a rule for a custom leaf module reaches its
submodules' tensors and attributes (``module_attribute``; rewrite sets a dotted attribute on the submodule).

Shape constants are declarative: ``r.const(arg, layouts)`` / ``r.module_attr(attr, layouts)`` record that an
argument or attribute equals the size of layouts. At rewrite, a constant whose size did not change is left as
written (``-1``, ``x.size(0)`` survive); a computed size (``C // heads``) is kept if re-evaluating the graph's size
arithmetic at the new sizes gives the right value; a run-time size times (or floor-divided by) a literal (``batch *
heads``, ``mul(sym_size, 4)``) gets a new node with the literal solved for the new size (``mul(sym_size, 3)``), so
it still follows the batch; otherwise it is replaced by the new int. Anything else (chunk -> split, slice bounds,
sdpa scale) is an ``r.on_rewrite`` hook.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune.errors import FxPruneError, describe_node
from fxprune.algebra.layout import Atom, Cat, Prod, Solver


# aten schemas name arguments differently from torch's Python functions
_SCHEMA_ALIASES = {
    "input": ("self",),
    "self": ("input",),
    "shape": ("size",),
    "sizes": ("size",),
    "dims": ("dim",),
    "split_size_or_sections": ("split_size", "split_sizes"),
    "tensor": ("self",),
    "other": ("mat2",),  # mm, bmm
    "mat1": ("batch1",),  # baddbmm, addbmm
    "mat2": ("batch2",),
    "dim": ("dims",),  # flip
    "dim0": ("axis0",),  # aten.swapaxes(self, axis0, axis1), as torch.export keeps x.swapaxes(1, 2)
    "dim1": ("axis1",),
}


class TensorRef:
    """A tensor in the graph: its key, its shape, and its axes as layouts."""

    def __init__(self, state: "AnalysisState", key: tuple, shape: tuple[int, ...]):
        self.state, self.key, self.shape = state, key, tuple(int(s) for s in shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, dim: int) -> Atom:
        dim = dim + self.ndim if dim < 0 else dim
        if not 0 <= dim < self.ndim:
            raise IndexError(f"axis {dim} of a {self.ndim}-d tensor {self.key}")
        return self.state.axis(self.key, dim, self.shape[dim])

    @property
    def axes(self) -> list[Atom]:
        return [self[d] for d in range(self.ndim)]

    @property
    def is_param(self) -> bool:
        return self.key[0] == "p"

    def __repr__(self) -> str:
        return f"TensorRef({self.key}, {self.shape})"


@dataclass
class ShapeConstant:
    """An argument or module attribute that equals sizes of layouts and must follow them."""

    node: fx.Node
    source: tuple  # ("args", i) | ("star", i) | ("kwargs", name) | ("attr", name)
    layouts: object  # a layout, or a list of layouts / None (keep) for sequence values
    index: int | None = None  # descend into element `index` of the value first


@dataclass
class AnalysisState:
    """Everything the relate pass accumulates; owned by the dependency graph afterwards."""

    gm: fx.GraphModule
    solver: Solver = field(default_factory=Solver)
    axis_atoms: dict = field(default_factory=dict)  # (key, dim) -> atom id
    shapes: dict = field(default_factory=dict)  # key -> shape
    freezes: list = field(default_factory=list)  # (layout, reason)
    broadcasts: list = field(default_factory=list)  # layouts with no data of their own
    normalized: list = field(default_factory=list)  # layouts some op normalises over (LayerNorm, softmax, mean)
    head_dims: list = field(default_factory=list)  # (layout, where): per-head widths that attention contracts over
    from_input: set = field(default_factory=set)  # names of nodes computed from a graph input (not weights alone)
    constants: list = field(default_factory=list)  # ShapeConstant
    hooks: list = field(default_factory=list)  # (node, fn(node, sizes))
    unsupported: list = field(default_factory=list)  # (node, message)
    min_kept: list = field(default_factory=list)  # (layout, count, where): units that must stay (top-k's k)
    sliced_constants: list = field(default_factory=list)  # (layout, node): values computed from constants
    canonical: dict = field(default_factory=dict)  # alias name of a shared tensor -> first name

    def __post_init__(self) -> None:
        first: dict[int, str] = {}
        named = list(self.gm.named_parameters(remove_duplicate=False)) + list(self.gm.named_buffers(remove_duplicate=False))
        for name, t in named:
            self.canonical[name] = first.setdefault(id(t), name)

    def param_key(self, name: str) -> tuple:
        """Tied tensors (one tensor under two names) share one key, so their axes are one."""
        return ("p", self.canonical.get(name, name))

    def axis(self, key: tuple, dim: int, size: int) -> Atom:
        if (key, dim) not in self.axis_atoms:
            self.axis_atoms[(key, dim)] = self.solver.new_atom(size, f"{key}[{dim}]")
            self.shapes.setdefault(key, None)
        return Atom(self.axis_atoms[(key, dim)])


_MISSING = object()


def module_attribute(module, name: str, default=None):
    """``module.a.b.c`` for ``name="a.b.c"`` (a rule's view of a leaf module's submodules), else ``default``."""
    for part in name.split("."):
        module = getattr(module, part, _MISSING)
        if module is _MISSING:
            return default
    return module


def tensor_value(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


class RuleContext:
    """The view of one node that a rule works through."""

    def __init__(self, state: AnalysisState, node: fx.Node, module: torch.nn.Module | None):
        self.state, self.node, self.module = state, node, module
        self.where = describe_node(node)
        self.sources: dict[str, tuple] = {}

    # -- tensors ---------------------------------------------------------
    def tensor(self, value) -> TensorRef | None:
        """A TensorRef for a node argument whose value is a tensor, else None."""
        if isinstance(value, TensorRef):
            return value
        val = tensor_value(value)
        if val is None:
            return None
        key = self.state.param_key(value.target) if value.op == "get_attr" else ("v", value.name, ())
        return TensorRef(self.state, key, val.shape)

    def input(self, i: int = 0) -> TensorRef | None:
        return self.tensor(self.node.args[i]) if i < len(self.node.args) else None

    def output(self, *path: int) -> TensorRef | None:
        val = self.node.meta.get("val")
        for p in path:
            if not isinstance(val, (tuple, list)) or p >= len(val):
                return None
            val = val[p]
        if not isinstance(val, torch.Tensor):
            return None
        return TensorRef(self.state, ("v", self.node.name, tuple(path)), val.shape)

    @property
    def out(self) -> TensorRef | None:
        return self.output()

    def param(self, name: str) -> TensorRef | None:
        """A parameter or buffer of the called module (``call_module`` nodes only); dotted names reach
        the tensors of its submodules (``r.param("inner.weight")``)."""
        if self.module is None:
            return None
        val = module_attribute(self.module, name)
        if not isinstance(val, torch.Tensor):
            return None
        return TensorRef(self.state, self.state.param_key(f"{self.node.target}.{name}"), val.shape)

    def tensors_in(self) -> list[TensorRef]:
        found: list[TensorRef] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(self.tensor(n)) or n)
        return [t for t in found if t is not None]

    def tensors_out(self) -> list[TensorRef]:
        out: list[TensorRef] = []

        def walk(val, path):
            if isinstance(val, torch.Tensor):
                out.append(TensorRef(self.state, ("v", self.node.name, path), val.shape))
            elif isinstance(val, (tuple, list)):
                for i, v in enumerate(val):
                    walk(v, path + (i,))

        walk(self.node.meta.get("val"), ())
        return out

    def module_tensors(self) -> list[TensorRef]:
        if self.module is None:
            return []
        named = list(self.module.named_parameters()) + list(self.module.named_buffers())
        return [TensorRef(self.state, self.state.param_key(f"{self.node.target}.{n}"), t.shape) for n, t in named]

    # -- arguments -------------------------------------------------------
    def bind(self, signature) -> dict:
        """Bind the node's arguments to a Python signature.

        For ``call_module`` nodes, parameters the call does not pass are taken
        from the module's attributes of the same name (``weight``, ``groups``,
        ``normalized_shape`` ...), so a module and its functional form share a rule.
        Tensor values come back as :class:`TensorRef`; defaults are filled in.
        """
        sig = inspect.signature(signature)
        schema = isinstance(self.node.target, torch._ops.OpOverload)
        arguments = self._bind_schema(sig) if schema else self._bind_python(sig)
        result = {}
        for name, param in sig.parameters.items():
            if param.kind == inspect.Parameter.VAR_KEYWORD:
                continue
            if name in arguments:
                value = arguments[name]
            elif self.module is not None and hasattr(self.module, name):
                value = getattr(self.module, name)
                self.sources[name] = ("attr", name)
                if isinstance(value, torch.Tensor):
                    value = TensorRef(self.state, self.state.param_key(f"{self.node.target}.{name}"), value.shape)
            elif param.default is not inspect.Parameter.empty:
                value = param.default
            elif param.kind == inspect.Parameter.VAR_POSITIONAL:
                value = ()
            elif schema:  # a schema name the rule does not know: fail here, not on a None later
                raise FxPruneError(f"{self.where}: the rule's argument {name!r} matches no argument of "
                                   f"{self.node.target._schema}; add the schema's name to context._SCHEMA_ALIASES")
            else:
                value = None
            ref = self.tensor(value) if isinstance(value, fx.Node) else None
            result[name] = ref if ref is not None else value
        return result

    def _bind_python(self, sig: inspect.Signature) -> dict:
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        kwargs = {k: v for k, v in self.node.kwargs.items() if takes_any or k in sig.parameters}
        bound = sig.bind_partial(*self.node.args, **kwargs)
        position, count = 0, len(self.node.args)
        for name, param in sig.parameters.items():
            positional = param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            if positional and position < count:
                self.sources[name] = ("args", position)
                position += 1
            elif param.kind == inspect.Parameter.VAR_POSITIONAL and position < count:
                self.sources[name] = ("star", position)
                position = count
            elif name in kwargs:
                self.sources[name] = ("kwargs", name)
        return dict(bound.arguments)

    def _bind_schema(self, sig: inspect.Signature) -> dict:
        """Bind an aten op's arguments by its schema's names, renamed to the rule's (``self`` -> ``input``).

        A list argument (``size``, ``dims``) meets a rule's ``*shape`` as one nested value,
        marked ``"wrapped"`` so that shape constants are written back unwrapped.
        """
        names = [a.name for a in self.node.target._schema.arguments]
        given, where = {}, {}
        for i, value in enumerate(self.node.args):
            given[names[i]], where[names[i]] = value, ("args", i)
        for key, value in self.node.kwargs.items():
            given[key], where[key] = value, ("kwargs", key)
        arguments = {}
        for name, param in sig.parameters.items():
            for candidate in (name,) + _SCHEMA_ALIASES.get(name, ()):
                if candidate not in given:
                    continue
                if param.kind == inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = (given[candidate],)
                    self.sources[name] = where[candidate] + ("wrapped",)
                else:
                    arguments[name] = given[candidate]
                    self.sources[name] = where[candidate]
                break
        return arguments

    # -- relations -------------------------------------------------------
    def fresh(self, size: int, why: str = "") -> Atom:
        """A new atom that belongs to no tensor yet (a factor or segment of one)."""
        return Atom(self.state.solver.new_atom(size, why or self.where))

    def same(self, a, b) -> None:
        """Index i of ``a`` is index i of ``b``."""
        if not self.state.solver.unify(a, b, self.where):
            self.freeze(a, "no common refinement")
            self.freeze(b, "no common refinement")

    def concat(self, whole, parts) -> None:
        self.same(whole, Cat(tuple(parts)))

    def product(self, flat, factors) -> None:
        self.same(flat, Prod(tuple(factors)))

    def broadcast(self, axis) -> None:
        """The axis has no data of its own (an expand copy): pruning it only changes a shape constant."""
        self.state.broadcasts.append(axis)

    def normalizes(self, axis) -> None:
        """An op computes statistics over this axis (LayerNorm, softmax, mean): pruning it is not exact."""
        self.state.normalized.append(axis)

    def head_dim(self, axis) -> None:
        """The axis is a per-head width of attention (q.k contraction, v's features): kept whole by default.

        Pruning it keeps the model exact but takes scaled-dot-product attention off its fused
        kernels; ``prune(..., prune_head_dims=True)`` prunes it anyway.
        """
        self.state.head_dims.append((axis, self.where))

    def keep_at_least(self, axis, count: int) -> None:
        """At least ``count`` units of the axis must stay (``topk(x, k)`` needs ``k`` of them); plans keep them."""
        self.state.min_kept.append((axis, int(count), self.where))

    def sliced_constant(self, axis) -> None:
        """The axis belongs to a tensor the forward computes from constants (``arange(1, 1 + H)``), whose kept
        values rewriting stores: exact in the pruned graph, but a model pruned in place recomputes it, so
        in-place pruning keeps the axis whole (:mod:`fxprune.rules.constants`)."""
        self.state.sliced_constants.append((axis, self.node))

    def reads_input(self, t: TensorRef | None) -> bool:
        """Whether a tensor is computed from the graph's inputs (an activation), not from weights alone."""
        return t is not None and t.key[0] == "v" and t.key[1] in self.state.from_input

    def freeze(self, what, why: str) -> None:
        """Every atom of ``what`` (a layout or a whole TensorRef) keeps all its units."""
        layouts = what.axes if isinstance(what, TensorRef) else [what]
        for layout in layouts:
            self.state.freezes.append((layout, f"{why}: {self.where}"))

    def freeze_all(self, why: str) -> None:
        for t in self.tensors_in() + self.tensors_out() + self.module_tensors():
            self.freeze(t, why)

    # -- shape constants -------------------------------------------------
    def const(self, name: str, layouts, index: int | None = None) -> None:
        """Bound argument ``name`` equals the size(s) of ``layouts``; rewrite it after pruning.

        ``layouts`` is one layout for an int value, or a list (``None`` entries are
        kept as they are, e.g. ``-1``) for a sequence value.
        """
        if name in self.sources:
            self.state.constants.append(ShapeConstant(self.node, self.sources[name], layouts, index))

    def module_attr(self, name: str, layouts) -> None:
        """Module attribute ``name`` (``in_channels``, ``num_features`` ...; dotted for a submodule's,
        ``"inner.out_features"``) follows ``layouts``."""
        if self.module is not None and module_attribute(self.module, name, _MISSING) is not _MISSING:
            self.state.constants.append(ShapeConstant(self.node, ("attr", name), layouts))

    def on_rewrite(self, fn) -> None:
        """Run ``fn(node, sizes)`` during rewrite, for rewrites that are not plain size constants."""
        self.state.hooks.append((self.node, fn))
