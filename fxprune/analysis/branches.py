"""Depth analysis: residual branches ``y = x + f(x)`` that can be removed (``y = x``), and the layers they form.

Found from the graph alone, no model names:

- a **residual add** is an add (``operator.add``, ``torch.add``, ``aten.add.Tensor``, ``x.add_``) of two tensors
  one of which, the *stream* ``x``, is a data ancestor of the other, the *branch output*. The branch ``f`` is
  every node on a data path from ``x`` to the branch output, plus the nodes only those read (its weights, a
  ``sym_size`` of ``x`` used by its views, checks such as ``_assert_tensor_metadata`` on its values). A layer
  scale (``x + gamma * f(x)``) is part of the branch; the add's operand order does not matter. A path through
  sizes, dtypes or ``*_like`` factories is not a data path: a mask built from ``x.shape`` is no part of ``x``'s
  branches. Inputs the branch reads besides ``x`` (graph inputs such as masks and positions, constants, rotary
  cos/sin computed once outside every branch) are its *shared inputs*; they stay.
- a branch is **removable** when the add can become ``x``: no node of the branch is read outside it (another
  branch, a graph output: then the reason names the reader), the sum has the stream's shape and dtype (a
  broadcasting add would change it), and no node of the branch writes into a tensor outside it. Branches
  without parameters are no depth candidates and are not listed.
- an add of two learned paths from one input (a ResNet block with downsampling: ``f(x) + downsample(x)``) is
  listed as a residual whose shortcut is not the identity: not removable.
- the **owner** of a branch is the common prefix of the module paths (``nn_module_stack``) of its nodes and of
  the add: ``model.layers.3`` for both branches of a LLaMA decoder layer, ``encoder.layer.0.attention`` for a
  BERT attention branch, ``layer1.1`` for a ResNet bottleneck.
- a **layer** is the deepest module on the owner's path that has a sibling of the same class under the same
  parent, or whose name is an index (an element of a ``ModuleList``/``Sequential`` of blocks: ``model.layers.3``,
  ``encoder.layer.0``, ``features.1.0``, ``encoder.layers.encoder_layer_0``; a one-layer model's
  ``model.layers.0``). A layer is removable as a whole (``layers=k``) when it
  is a closed block: one stream ``x_in`` enters (the stream of its first branch, computed outside it), exactly
  one node leaves it with ``x_in``'s shape, and nothing else it computes is read outside. Removing a layer
  replaces its output by ``x_in``: on a pre-norm model (LLaMA, ViT, ConvNeXt) that is removing all of its
  branches; on a post-norm model (BERT: ``LayerNorm(x + f(x))``) it also removes the layer's norms, whereas
  removing a branch alone keeps its norm (the add becomes ``x``, so ``LayerNorm(x)`` remains): the branch
  is still removable, and the layer norm keeps normalising the stream as the next layer expects.
- the **kind** of a branch: ``"attention"`` when it holds a scaled-dot-product attention or a softmax over a
  product of two computed tensors (scores over tokens; a router's softmax over experts reads a weight and is
  not attention), else ``"conv"`` when it holds a convolution, else ``"mlp"``.

Results: ``node.meta["fxprune_residual"]`` on each residual add (:data:`RESIDUAL`: the branch id, its stream
operand, whether it is removable and why not) and ``node.meta["fxprune_branch"]`` on every node of a branch
(:data:`BRANCH`: the ids of the branches that hold the node, outermost first); ``dg.branches`` and
``dg.layers`` on the :class:`~fxprune.analysis.depgraph.DependencyGraph`, listed by ``dg.report()``.

Example (a tiny LLaMA with 2 layers)::

    >>> dg = fxprune.analyze(model, (ids,))
    >>> [(b.owner, b.kind, b.removable) for b in dg.branches]
    [('model.layers.0', 'attention', True), ('model.layers.0', 'mlp', True),
     ('model.layers.1', 'attention', True), ('model.layers.1', 'mlp', True)]
    >>> [(layer.name, layer.removable) for layer in dg.layers]
    [('model.layers.0', True), ('model.layers.1', True)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune.errors import describe_node

RESIDUAL = "fxprune_residual"  # node.meta key on a residual add: {"branch", "stream", "removable", "reason"}
BRANCH = "fxprune_branch"  # node.meta key on every node of a branch: branch ids holding it, outermost first

ADD_OPS = frozenset({"add", "add_", "iadd"})
# ops whose output depends on their tensor operand's shape, dtype or device only: no data path goes through them
SHAPE_ONLY = frozenset({"sym_size", "sym_numel", "sym_stride", "size", "dim", "numel", "stride", "getattr",
                        "new_ones", "new_zeros", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
                        "full_like", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"})
SOFTMAX = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"})
PRODUCTS = frozenset({"matmul", "bmm", "mm", "baddbmm", "einsum", "__matmul__"})
CONVOLUTIONS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                          "conv_transpose2d", "conv_transpose3d", "conv1d_padding", "conv2d_padding"})


@dataclass(eq=False)
class Branch:
    """A residual branch ``y = x + f(x)``: removing it turns the add into ``x``."""

    id: int
    add: str  # the residual add's node name
    stream: str  # the stream operand x (node name)
    output: str  # the branch operand f(x) (node name)
    nodes: tuple = ()  # names of the branch's nodes, in graph order (removed with it)
    inputs: tuple = ()  # shared inputs the branch reads besides the stream (node names)
    owner: str = ""  # module path owning the add and every node of the branch ("" : the root)
    layer: str | None = None  # the layer (element of a list of blocks) the branch belongs to
    kind: str = "mlp"  # "attention" | "mlp" | "conv"
    removable: bool = True
    reason: str = ""  # why it is not removable
    parameters: tuple = ()  # parameter and buffer names only the branch uses
    params: int = 0  # parameters removed with it
    macs: int = 0  # MACs of its nodes at the example's shapes
    inside: int | None = None  # id of the smallest branch that holds this one (nested residuals)

    def __repr__(self) -> str:
        state = "removable" if self.removable else f"kept: {self.reason}"
        return f"Branch(#{self.id}, {self.kind}, {self.owner or '<root>'}, {self.params} params, {state})"


@dataclass(eq=False)
class Layer:
    """A block of a list of blocks, removable as a whole: its output becomes the stream that enters it."""

    name: str  # module path ("model.layers.3")
    branches: list = field(default_factory=list)  # its Branch objects, graph order
    input: str = ""  # the stream entering the layer (node name)
    output: str = ""  # the node leaving the layer (node name)
    nodes: tuple = ()  # names of the layer's nodes (removed with it)
    parameters: tuple = ()
    params: int = 0
    macs: int = 0
    removable: bool = True
    reason: str = ""

    @property
    def index(self) -> int | None:
        """The layer's position in its list when the last part of its name is an integer, else None."""
        last = self.name.rpartition(".")[2]
        return int(last) if last.isdigit() else None

    def __repr__(self) -> str:
        state = "removable" if self.removable else f"kept: {self.reason}"
        return f"Layer({self.name}, {len(self.branches)} branches, {self.params} params, {state})"


# -- small helpers on nodes -------------------------------------------------------------------------------------

def op_name(node: fx.Node) -> str:
    """The op's bare name: ``"add"`` for ``operator.add``, ``torch.add``, ``aten.add.Tensor`` and ``x.add``;
    a called module's class name in lower case."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def module_path(node: fx.Node) -> str | None:
    """The module a node runs in (a called module: itself), from ``nn_module_stack``; None when unknown."""
    if node.op == "call_module":
        return node.target
    decomposed = node.meta.get("fxprune_decomposed")  # an nn.MultiheadAttention call written out by decompose
    if decomposed:
        return decomposed["call"]["module"]
    stack = node.meta.get("nn_module_stack")
    if not stack:  # symbolic_trace records no stack for the root module's own ops
        return "" if node.op in ("call_function", "call_method") else None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return None
    return path


def _within(path: str | None, prefix: str) -> bool:
    return path is not None and (prefix == "" or path == prefix or path.startswith(prefix + "."))


def _common_prefix(paths) -> str:
    parts = None
    for path in paths:
        items = path.split(".") if path else []
        if parts is None:
            parts = items
        else:
            n = 0
            while n < min(len(parts), len(items)) and parts[n] == items[n]:
                n += 1
            parts = parts[:n]
    return ".".join(parts or [])


def _is_tensorish(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def carries_data(node: fx.Node) -> bool:
    """Whether the node's output holds tensor values computed from its inputs' values (not sizes or checks)."""
    if node.op in ("output", "placeholder", "get_attr"):
        return node.op != "output"
    return _is_tensorish(node.meta.get("val")) and op_name(node) not in SHAPE_ONLY


ALIASES = frozenset({"to", "_to_copy", "alias", "contiguous", "clone", "type_as", "detach", "lift_fresh_copy",
                     "dropout", "identity"})


def alias_root(node: fx.Node) -> fx.Node:
    """``node`` behind ops that return their input's values unchanged at the same shape and dtype (an export
    graph's ``hidden.to(float32)`` on a float32 tensor is the tensor itself, and the tracer hands the residual
    add that node: the layer's real input is behind it)."""
    while (op_name(node) in ALIASES or node.op == "call_method" and node.target in ALIASES) and node.args \
            and isinstance(node.args[0], fx.Node):
        src, val = node.args[0], node.meta.get("val")
        sv = src.meta.get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(sv, torch.Tensor) and val.shape == sv.shape
                and val.dtype == sv.dtype):
            break
        if op_name(node) == "dropout" and node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True):
            break
        node = src
    return node


def _mutates(node: fx.Node) -> bool:
    name = op_name(node)
    return (name.endswith("_") and not name.startswith("__") and name not in ("add_", "iadd")) or name in (
        "copy_", "index_put_", "index_copy_", "scatter_")


def _parameter_names(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    if node.op == "get_attr":
        return [node.target]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return [f"{node.target}.{n}" for n, _ in module.named_parameters()]
    return []


# -- finding branches -------------------------------------------------------------------------------------------

class _Finder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.tensors = dict(gm.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(gm.named_buffers(remove_duplicate=False)))

    def descendants(self, x: fx.Node, limit: int) -> set:
        """Data descendants of ``x`` (excluding ``x``) up to graph position ``limit``."""
        out, todo = set(), [x]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u not in out and self.order[u] <= limit and carries_data(u):
                    out.add(u)
                    todo.append(u)
        return out

    def between(self, x: fx.Node, y: fx.Node) -> set | None:
        """Nodes on a data path from ``x`` to ``y`` (``y`` included, ``x`` not); None if ``y`` does not read ``x``."""
        down = self.descendants(x, self.order[y])
        if y not in down:
            return None
        inside, todo = {y}, [y]
        while todo:
            n = todo.pop()
            for a in n.all_input_nodes:
                if a in down and a not in inside:
                    inside.add(a)
                    todo.append(a)
        return inside

    def close(self, members: set, keep: set) -> set:
        """``members`` plus the nodes only they read (weights, sizes) and user-less checks of their values;
        never a node of ``keep``, a placeholder or the output."""
        members = set(members)
        changed = True
        while changed:
            changed = False
            frontier = {a for n in members for a in n.all_input_nodes} | {u for n in members for u in n.users}
            for c in frontier - members:
                if c in keep or c.op in ("placeholder", "output"):
                    continue
                if c.users and all(u in members for u in c.users):
                    members.add(c)
                    changed = True
                elif not c.users and c.op != "get_attr" and not _mutates(c) and all(
                        a in members or not carries_data(a) for a in c.all_input_nodes):
                    members.add(c)  # a check on the branch's values (_assert_tensor_metadata): goes with them
                    changed = True
        return members

    def parameters_of(self, members: set) -> tuple[list[str], int]:
        names = [p for n in members for p in _parameter_names(self.gm, n)]
        names = list(dict.fromkeys(names))
        seen, count = set(), 0
        for name in names:
            t = self.tensors.get(name)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                count += t.numel() if isinstance(t, torch.nn.Parameter) else 0
        return names, count


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(args) == 1 and isinstance(node.kwargs.get("other"), fx.Node):
        args.append(node.kwargs["other"])
    return [a for a in args if isinstance(a.meta.get("val"), torch.Tensor)]


def _kind(gm: fx.GraphModule, members: set) -> str:
    has_conv = False
    for n in members:
        name = op_name(n).lower()
        if n.op == "call_module":
            cls = type(gm.get_submodule(n.target)).__name__
            if "attention" in cls.lower():
                return "attention"
            has_conv = has_conv or "conv" in cls.lower()
            continue
        if "scaled_dot_product" in name or "attention" in name:
            return "attention"
        if name in SOFTMAX and _scores_of_two_activations(n, members):
            return "attention"
        has_conv = has_conv or name in CONVOLUTIONS
    return "conv" if has_conv else "mlp"


def _scores_of_two_activations(softmax: fx.Node, members: set, depth: int = 6) -> bool:
    """Whether a softmax's input is (a few elementwise steps after) a product of two tensors computed in the
    branch: attention scores over tokens; a router's ``softmax(x @ W)`` reads a weight."""
    todo, seen = [(softmax.args[0], 0)], set()
    while todo:
        n, d = todo.pop()
        if not isinstance(n, fx.Node) or n in seen or d > depth:
            continue
        seen.add(n)
        if op_name(n) in PRODUCTS:
            operands = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
            if len(operands) >= 2 and all(a in members and a.op not in ("get_attr", "placeholder")
                                          for a in operands[-2:]):
                return True
        todo.extend((a, d + 1) for a in n.all_input_nodes if a in members)
    return False


_COUNTING: dict = {}  # id(gm) -> (gm, shapes, modules) while one graph is analysed


def _macs(gm: fx.GraphModule, members) -> int:
    from fxprune.analysis.macs import node_macs
    from fxprune.analysis.shapes import GraphShapes

    cached = _COUNTING.get(id(gm))
    if cached is None or cached[0] is not gm:
        cached = _COUNTING[id(gm)] = (gm, GraphShapes(gm), dict(gm.named_modules()))
    _, shapes, modules = cached
    total = 0
    for n in members:
        try:
            total += node_macs(n, modules, shapes)
        except Exception:  # a node the counter cannot size: counts 0, as in fxprune.count
            continue
    return total


def _describe_reader(node: fx.Node, user: fx.Node, branch_of: dict) -> str:
    other = branch_of.get(user)
    where = f" (in branch #{other})" if other is not None else (" (a graph output)" if user.op == "output" else "")
    return f"{describe_node(node)} is also read by {describe_node(user)}{where} outside the branch"


def find_branches(gm: fx.GraphModule) -> list[Branch]:
    """Every residual branch of ``gm`` (nodes need ``meta["val"]``), removable or not, in graph order; tags
    the nodes with :data:`RESIDUAL` and :data:`BRANCH`."""
    finder = _Finder(gm)
    found: list[tuple[fx.Node, fx.Node, fx.Node, set]] = []
    shortcuts: list[tuple[fx.Node, str]] = []
    for add in finder.nodes:
        if add.op not in ("call_function", "call_method") or op_name(add) not in ADD_OPS:
            continue
        operands = _tensor_args(add)
        if len(operands) != 2 or operands[0] is operands[1]:
            continue
        for x, out in ((operands[0], operands[1]), (operands[1], operands[0])):
            path = finder.between(x, out)
            if path is not None:
                found.append((add, x, out, path))
                break
        else:
            why, main = _computed_shortcut(finder, add, operands)
            if why:
                shortcuts.append((add, why, main))
    branches = []
    for add, x, out, path in found:
        members = finder.close(path, {x, add})
        names, count = finder.parameters_of(members)
        if not names:
            continue  # no weights: nothing to save and no learned block (a norm's `x + eps` ...)
        branches.append(_make_branch(gm, finder, len(branches), add, x, out, members, names, count, path))
    for add, why, main in shortcuts:  # a residual add whose shortcut is computed: listed, never removed
        branch = Branch(-1, add.name, "", "", owner=module_path(add) or "", kind=_kind(gm, main), removable=False,
                        reason=why)
        branch._add = add
        branches.append(branch)
    branches.sort(key=lambda b: finder.order[b._add])  # ids in graph order of the adds
    for i, b in enumerate(branches):
        b.id = i
        if not b.stream:
            b._add.meta[RESIDUAL] = {"branch": i, "stream": None, "removable": False, "reason": b.reason}
    _check(gm, finder, branches)
    _nest(gm, branches)
    _assign_layers(gm, branches)
    _COUNTING.pop(id(gm), None)
    return branches


def _make_branch(gm, finder, id_, add, x, out, members, names, count, path) -> Branch:
    ordered = sorted(members, key=finder.order.__getitem__)
    inputs = {a for n in members for a in n.all_input_nodes if a not in members and a is not x and carries_data(a)}
    # the owner comes from the nodes on the data paths: what only the branch reads (a one-layer model's mask and
    # rotary tables, computed in the model's own forward) goes with it but does not move its owner up
    paths = [p for p in (module_path(n) for n in sorted(path, key=finder.order.__getitem__)) if p is not None]
    add_path = module_path(add)
    owner = _common_prefix(paths + ([add_path] if add_path is not None else []))
    branch = Branch(id_, add.name, x.name, out.name, tuple(n.name for n in ordered),
                    tuple(sorted((a.name for a in inputs), key=lambda s: s)), owner, None, _kind(gm, members),
                    parameters=tuple(names), params=count, macs=_macs(gm, members))
    branch._members = members  # node objects, for the checks below (not part of the record)
    branch._add, branch._stream, branch._out = add, x, out
    return branch


def _check(gm, finder, branches) -> None:
    branch_of = {}
    for b in branches:
        for n in getattr(b, "_members", ()):
            branch_of.setdefault(n, b.id)
    for b in branches:
        if not hasattr(b, "_members"):
            continue
        members, add, x = b._members, b._add, b._stream
        reason = ""
        for n in sorted(members, key=finder.order.__getitem__):
            readers = [u for u in n.users if u not in members and u is not add]
            if readers:
                reason = _describe_reader(n, readers[0], {k: v for k, v in branch_of.items() if v != b.id})
                break
            if _mutates(n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in members:
                reason = f"{describe_node(n)} writes into {n.args[0].name}, which is outside the branch"
                break
        xv, yv = x.meta.get("val"), add.meta.get("val")
        if not reason and (tuple(xv.shape) != tuple(yv.shape) or xv.dtype != yv.dtype):
            reason = (f"removing it would change {describe_node(add)} from {tuple(yv.shape)} {yv.dtype} to the "
                      f"stream's {tuple(xv.shape)} {xv.dtype}")
        b.removable, b.reason = not reason, reason
        add.meta[RESIDUAL] = {"branch": b.id, "stream": x.name, "removable": b.removable, "reason": b.reason}
        for n in members:
            n.meta.setdefault(BRANCH, [])
            if b.id not in n.meta[BRANCH]:
                n.meta[BRANCH].append(b.id)


def _nest(gm, branches) -> None:
    """``Branch.inside``: the smallest branch whose nodes hold this branch's add; ``BRANCH`` lists outermost
    first."""
    by_size = sorted((b for b in branches if hasattr(b, "_members")), key=lambda b: len(b._members))
    for b in branches:
        if not hasattr(b, "_members"):
            continue
        for other in by_size:
            if other is not b and b._add in other._members:
                b.inside = other.id
                break
    sizes = {b.id: len(getattr(b, "_members", ())) for b in branches}
    for n in gm.graph.nodes:
        if BRANCH in n.meta:
            n.meta[BRANCH].sort(key=lambda i: -sizes.get(i, 0))


def _computed_shortcut(finder: _Finder, add: fx.Node, operands: list, window: int = 400) -> tuple[str, set]:
    """Why an add of two learned paths from one input (``f(x) + downsample(x)``) is no removable residual, and
    the longer path's nodes; ``('', set())`` when it is not one."""
    lo = finder.order[add] - window

    def ancestors(n):
        out, todo = {}, [(n, 0)]
        while todo:
            m, d = todo.pop()
            if m in out or finder.order[m] < lo or not carries_data(m):
                continue
            out[m] = d
            todo.extend((a, d + 1) for a in m.all_input_nodes)
        return out

    a, b = ancestors(operands[0]), ancestors(operands[1])
    # a common stream: a float tensor (two embeddings indexed by one sliced position buffer share no stream)
    common = [n for n in a if n in b and n.op != "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].is_floating_point()]
    if not common:
        return "", set()
    fork = max(common, key=finder.order.__getitem__)
    paths = [finder.between(fork, op) or set() for op in operands]
    if not all(finder.parameters_of(finder.close(p, {fork, add}) - {fork})[0] for p in paths):
        return "", set()
    (_, shortcut), (main, _) = sorted(zip(paths, operands), key=lambda po: len(po[0]))
    where = module_path(shortcut) or shortcut.name
    return (f"the shortcut is computed ({where}), not the stream itself: both operands of {describe_node(add)} "
            f"are learned paths from {fork.name}"), main


def last_projection(gm, branch) -> list[str]:
    """Names of the parameters that make a branch's output: walking back from the branch's output through its
    nodes, every parameter read on the way up to and including the first weight of two or more dimensions on
    each path (the output projection ``o_proj``, a ResNet block's last conv and the BatchNorm after it, a layer
    scale). Zeroing them makes the branch's output exactly zero whatever its input."""
    members = set(branch.nodes)
    nodes = {n.name: n for n in gm.graph.nodes}
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    out, todo, seen = [], [nodes[branch.output]], set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "call_module":
            names = [f"{node.target}.{n}" for n, _ in gm.get_submodule(node.target).named_parameters()]
        else:
            names = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in tensors]
        out += names
        if any(tensors[n].ndim >= 2 for n in names):
            continue  # the projection: what comes before it no longer matters
        todo.extend(a for a in node.all_input_nodes if a.name in members and a.op != "get_attr")
    return list(dict.fromkeys(out))


# -- layers -----------------------------------------------------------------------------------------------------

def module_classes(gm: fx.GraphModule) -> dict[str, str]:
    """``{module path: class name}`` of every module the graph runs in (from ``nn_module_stack``)."""
    classes = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            if isinstance(path, str) and not path.startswith("_empty_nn_module_stack"):
                classes.setdefault(path, getattr(cls, "__qualname__", str(cls)))
        if n.op == "call_module":
            classes.setdefault(n.target, type(gm.get_submodule(n.target)).__qualname__)
    return classes


def layer_of(path: str, classes: dict) -> str | None:
    """The deepest module on ``path`` (itself included) with a sibling of its class, or named by an index (an
    element of a list of one block): an element of a list of blocks. ``model.layers.3.self_attn`` ->
    ``model.layers.3``."""
    parts = path.split(".") if path else []
    siblings: dict[tuple, int] = {}
    for p, cls in classes.items():
        parent = p.rpartition(".")[0]
        siblings[(parent, cls)] = siblings.get((parent, cls), 0) + 1
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        cls = classes.get(prefix)
        if cls is not None and (siblings.get((prefix.rpartition(".")[0], cls), 0) > 1 or parts[k - 1].isdigit()):
            return prefix
    return None


def _assign_layers(gm, branches) -> None:
    classes = module_classes(gm)
    for b in branches:
        b.layer = layer_of(b.owner, classes)


def find_layers(gm: fx.GraphModule, branches: list[Branch]) -> list[Layer]:
    """Every layer that owns a residual branch, with whether it can be removed whole (see module docstring)."""
    finder = _Finder(gm)
    by_name: dict[str, Layer] = {}
    for b in branches:
        if b.layer is not None:
            by_name.setdefault(b.layer, Layer(b.layer)).branches.append(b)
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = []
    for layer in by_name.values():
        _layer_bounds(gm, finder, layer, nodes)
        layers.append(layer)
    layers.sort(key=lambda layer: finder.order[nodes[layer.output]] if layer.output in nodes else 0)
    _COUNTING.pop(id(gm), None)
    return layers


def _layer_bounds(gm, finder: _Finder, layer: Layer, nodes: dict) -> None:
    name = layer.name
    identity = [b for b in layer.branches if b.stream]
    if not identity:
        layer.removable, layer.reason = False, layer.branches[0].reason
        return
    first = min(identity, key=lambda b: finder.order[nodes[b.add]])
    x = alias_root(nodes[first.stream])
    if _within(module_path(x), name):
        layer.removable, layer.reason = False, f"its first residual's stream {x.name} is computed inside the layer"
        return
    seed = {n for n in finder.nodes if n.op not in ("placeholder", "output") and n is not x and (
        _within(module_path(n), name) if n.op != "get_attr" else n.target.startswith(name + "."))}
    for b in layer.branches:
        seed |= set(getattr(b, "_members", ()))
    members = finder.close(seed, {x})
    leaving = [n for n in members if carries_data(n) and any(u not in members for u in n.users)]
    layer.input = x.name
    layer.nodes = tuple(n.name for n in sorted(members, key=finder.order.__getitem__))
    layer.parameters, layer.params = finder.parameters_of(members)
    layer.macs = _macs(gm, members)
    if len(leaving) != 1:
        what = ", ".join(n.name for n in leaving[:4]) or "nothing"
        layer.removable, layer.reason = False, f"{len(leaving)} of its values are read outside it ({what}), not one"
        return
    out = leaving[0]
    layer.output = out.name
    xv, ov = x.meta.get("val"), out.meta.get("val")
    if not isinstance(ov, torch.Tensor) or tuple(ov.shape) != tuple(xv.shape) or ov.dtype != xv.dtype:
        shape = tuple(ov.shape) if isinstance(ov, torch.Tensor) else type(ov).__name__
        layer.removable, layer.reason = False, f"its output {out.name} {shape} is not shaped as its input {x.name} " \
                                               f"{tuple(xv.shape)}"
        return
    if out not in finder.descendants(x, finder.order[out]):
        layer.removable, layer.reason = False, f"its output {out.name} does not read its input {x.name}"
        return
    for n in members:
        if _mutates(n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in members:
            layer.removable, layer.reason = False, f"{describe_node(n)} writes into {n.args[0].name} outside it"
            return
    layer.removable, layer.reason = True, ""
