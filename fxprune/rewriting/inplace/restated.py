"""Integer attributes that restate a pruned width in the model's own Python, updated from the graph or by value.

A model's forward reads widths from its own attributes (``x.view(B, N, self.num_heads, -1)``, ultralytics'
``split((self.c, self.c), 1)``, diffusers' ``attn.heads``); the torch classes' own attributes are
:mod:`~fxprune.rewriting.inplace.torch_modules`'. Two ways, neither reading attribute names:

- **decided** (:func:`decide_from_constants`): the captured graph shows such an attribute's value as an integer
  argument of the ops run inside its module (the innermost entry of each node's ``nn_module_stack``; ``call_function``
  and ``call_method`` nodes, so symbolic_trace's ``x.view(...)`` too). Rewriting changed that argument where a
  pruned width changed; an attribute equal to an argument that rewriting mapped to exactly one other value follows
  it (every element of a tuple of ints likewise: a weightless ``LayerNorm``'s ``normalized_shape`` under export).
- **followed** (:func:`follow_widths`): an integer attribute that no op shows (C2f's ``self.c``, read only by
  ``forward_split``; an ``assert x.shape[1] == self.channels`` that export drops) and equals the old size of a
  width that every changed tensor of its module's subtree shrank to one same new size, follows it. A guess, which
  the output check confirms (:func:`unfollow` takes it back when the model then computes something else). An
  attribute whose value is its module's position in a list (ultralytics' layer index ``i``) is an index, not a
  width.

Example::

    >>> decide_from_constants(model, dg.gm, pruned, original)   # timm Attention: reshape(B, N, 3, 6, 64) -> 4 heads
    {'blocks.0.attn.num_heads'}
    >>> follow_widths(model, changed, skip)                      # C2f.c 16 -> 8 (cv1: 32 -> 16, m.0: 16 -> 8)
    {'model.2.c': 16}
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from fxprune.dotted import set_attribute
from fxprune.rewriting.inplace.tensors import changed_widths


def constant_changes(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, dict[int, set]]:
    """``{module path: {old int argument: new values}}`` over every op of the graph run inside the module (the
    innermost entry of its ``nn_module_stack``), pairing each node's integer arguments with the rewritten node's.
    An argument that rewriting left alone maps to itself."""
    rewritten = {n.name: n for n in after.graph.nodes}
    changes: dict[str, dict[int, set]] = {}
    for node in before.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        other = rewritten.get(node.name)
        if node.op not in ("call_function", "call_method") or not stack or other is None:
            continue
        old, new = _ints((node.args, node.kwargs)), _ints((other.args, other.kwargs))
        if len(old) != len(new):
            continue
        found = changes.setdefault(list(stack.values())[-1][0], {})
        for a, b in zip(old, new):
            found.setdefault(a, set()).add(b)
    return changes


def decide_from_constants(model: nn.Module, before: fx.GraphModule, after: fx.GraphModule, original: dict,
                          skip=frozenset(), unchanged: bool = True) -> set:
    """Set the attributes the rewritten graph decides (see module docstring); returns their ``"module.attr"``.

    ``original``: ``{(id(module), attr): value}`` before any update. Where the module's own ops used an
    attribute's original value as an argument that rewriting mapped to exactly one value, the attribute takes
    it: one an earlier update changed (a name-based guess) is corrected (XGLM reshapes by ``embed_dim``, which
    stays the query width when only the hidden size shrinks), one mapped to itself is decided to stay (so that
    no later guess moves it), and, with ``unchanged`` (any model), one no update changed follows a changed
    argument (timm's ``attn_dim``). A library that can tell those apart otherwise (the Hugging Face layer
    rebuilds from the config: XGLM's position count equals its hidden size and its ops' 64 is the hidden size
    only) passes ``unchanged=False``. One whose value rewriting mapped to several (a head count equal to a
    kv-group count) or that no op of its module used stays. ``skip``: ``"module.attr"`` names another step owns
    (a torch module's widths).
    """
    decided = set()
    for path, found in constant_changes(before, after).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for attr, value in list(vars(module).items()):
            key = f"{path}.{attr}" if path else attr
            old = original.get((id(module), attr))
            if key in skip or attr.startswith("_") or not _same_kind(value, old):
                continue
            new = _mapped(old, found)
            if new is None:
                continue
            if value != old or new == old or unchanged:
                setattr(module, attr, new)
                decided.add(key)
    return decided


def _same_kind(value, old) -> bool:
    if type(value) is int and type(old) is int:
        return True
    return type(value) is tuple and type(old) is tuple and len(value) == len(old) and bool(old) and \
        all(type(v) is int for v in (*value, *old))


def _mapped(old, found: dict):
    """``old`` (an int, or a tuple of ints element by element) through ``found`` (old argument -> new values);
    None when an element maps to several values or no element appears."""
    if type(old) is int:
        values = found.get(old, ())
        return next(iter(values)) if len(values) == 1 else None
    items = [_mapped(v, found) for v in old]
    if all(i is None for i in items) or any(i is None and v in found for i, v in zip(items, old)):
        return None
    return tuple(v if i is None else i for i, v in zip(items, old))


def decide_head_counts(model: nn.Module, before: dict, after: dict, changes: dict, original: dict,
                       skip=frozenset(), ambiguous: dict | None = None) -> set:
    """Head counts of the modules the graph calls attention in (``before``/``after``:
    :func:`fxprune.analysis.attention_sites.attention_sites` of the analysed and rewritten graphs): an integer
    attribute of such a module equal to its old head count (kv head count, heads per kv head) takes the new one,
    where the module's own ops used that value as an argument rewriting mapped to the new one (``changes``:
    :func:`constant_changes`). This settles what the arguments alone leave open: timm's
    ``reshape(B, N, 3, self.num_heads, self.head_dim)`` with 3 heads maps 3 to both 3 and 2. An attribute
    another step changed (``original``), a layer index (:func:`positional`) or one in ``skip`` stays.
    Returns the ``"module.attr"`` names set.

    Where the module's ops also used that value as an argument rewriting kept (StableLM's ``rotary_ndims`` 4 next
    to its 4 heads: ``x[..., :4]`` stays, ``view(1, 7, 4, 16)`` goes to 1 head), the attribute may be either:
    it is set, and ``ambiguous`` (when given) gets ``{"module.attr": old value}`` for the output check to put
    back if the model then computes something else."""
    decided = set()
    indices = positional(model)
    for path, old in before.items():
        new = after.get(path)
        if new is None or new == old:
            continue
        pairs: dict[int, set] = {}
        for a, b in ((old.heads, new.heads), (old.kv_heads, new.kv_heads)):
            pairs.setdefault(a, set()).add(b)
        if old.kv_heads and new.kv_heads and old.heads // old.kv_heads > 1:
            pairs.setdefault(old.heads // old.kv_heads, set()).add(new.heads // new.kv_heads)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        found = changes.get(path, {})
        for attr, value in list(vars(module).items()):
            key = f"{path}.{attr}" if path else attr
            if attr.startswith("_") or type(value) is not int or key in skip or (id(module), attr) in indices:
                continue
            if original.get((id(module), attr), value) != value or len(pairs.get(value, ())) != 1:
                continue
            target = next(iter(pairs[value]))
            if target != value and target in found.get(value, ()):
                setattr(module, attr, target)
                decided.add(key)
                if ambiguous is not None and len(found[value]) > 1:
                    ambiguous[key] = value
    return decided


def follow_widths(model: nn.Module, changed: dict, skip=frozenset(), original=None) -> dict:
    """Integer attributes that still hold the old size of a width their module's tensors shrank to one new size
    take it (see module docstring). ``changed``: ``{tensor name: (old shape, new shape)}``; ``skip``:
    ``"module.attr"`` names set otherwise; ``original``: ``{(id(module), attr): value}`` before any update (an
    attribute another step changed is left alone). Returns ``{"module.attr": value before}`` of those followed."""
    followed = {}
    indices = positional(model)
    for path, module in model.named_modules():
        widths = changed_widths(changed, path)
        if not widths:
            continue
        for attr, value in list(vars(module).items()):
            key = f"{path}.{attr}" if path else attr
            if attr.startswith("_") or type(value) is not int or key in skip or value < 2:
                continue
            if original is not None and original.get((id(module), attr), value) != value:
                continue
            if (id(module), attr) in indices:
                continue  # a layer index (ultralytics' `i`, transformers' `layer_idx`), not a width
            new = widths.get(value, ())
            if len(new) == 1:
                followed[key] = value
                setattr(module, attr, next(iter(new)))
    return followed


def unfollow(model: nn.Module, followed: dict) -> None:
    """Put back the attributes :func:`follow_widths` (or a library's own guess) set: ``{"module.attr": value}``."""
    for key, value in followed.items():
        set_attribute(model, key, value)


def positional(model: nn.Module) -> set[tuple[int, str]]:
    """``(id(module), attr)`` of the integer attributes that number the elements of a ``ModuleList`` or
    ``Sequential``: at the same place in every element (the element itself or the same submodule of it), equal to
    the element's position in every one of at least two elements (ultralytics' ``model.model[i].i``,
    transformers' ``layers[i].self_attn.layer_idx``). A head count equal to one layer's position is the same in
    every layer, so it is not one of them."""
    out = set()
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        table: dict[tuple[str, str], list] = {}
        for position, element in enumerate(container.children()):
            for rel, module in element.named_modules():
                for attr, value in vars(module).items():
                    if type(value) is int and not attr.startswith("_"):
                        table.setdefault((rel, attr), []).append((position, module, value))
        for (_, attr), entries in table.items():
            if len(entries) >= 2 and all(position == value for position, _, value in entries):
                out.update((id(module), attr) for _, module, _ in entries)
    return out


def _ints(args) -> list:
    out = []

    def visit(a):
        if type(a) is int:
            out.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out
