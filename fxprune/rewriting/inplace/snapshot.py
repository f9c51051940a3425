"""Everything in-place pruning may change in the caller's model, saved first and put back exactly on failure.

In-place pruning never writes into a tensor: it puts new tensors, attributes and (where a torch class cannot
hold the pruned widths) new submodules into the module tree. So saving, for every module, its ``__dict__``
(shallow: the attribute values themselves) and the contents of its ``_parameters``, ``_buffers`` and
``_modules`` tables and of its ``_non_persistent_buffers_set``, puts the model back bit for bit: the very
tensors, modules and attribute values it had, in the same table objects. Other objects whose fields change
with the model (a Hugging Face config, which attention modules hold a reference to) are saved by deep copy of
their fields. A ``torch.fx.GraphModule`` regenerates its code from its restored graph.

Example::

    >>> saved = Snapshot(model, model.config)
    >>> ...                          # tensors, attributes and config changed; then something fails
    >>> saved.restore()              # the caller's model exactly as it was
"""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

_TABLES = ("_parameters", "_buffers", "_modules")


class Snapshot:
    """The state of ``model``'s module tree (every module reachable from it now) and of ``objects``' fields."""

    def __init__(self, model: nn.Module, *objects) -> None:
        self.model = model
        self.modules = []
        for module in model.modules():
            state = vars(module)
            tables = {t: dict(state[t]) for t in _TABLES if t in state}
            persistence = set(state.get("_non_persistent_buffers_set", ()))
            self.modules.append((module, dict(state), tables, persistence))
        self.objects = [(o, copy.deepcopy(vars(o))) for o in objects if o is not None]

    def restore(self) -> None:
        """Put every saved module's attributes and tables and every saved object's fields back."""
        for module, attributes, tables, persistence in self.modules:
            state = vars(module)
            state.clear()
            state.update(attributes)  # the table objects themselves are among the attributes
            for table, entries in tables.items():
                state[table].clear()
                state[table].update(entries)
            if "_non_persistent_buffers_set" in state:
                state["_non_persistent_buffers_set"].clear()
                state["_non_persistent_buffers_set"].update(persistence)
            if isinstance(module, fx.GraphModule):  # its forward is generated from its (restored) graph
                module.recompile()
        for obj, fields in self.objects:
            vars(obj).clear()
            vars(obj).update(fields)

    def changed(self) -> list[str]:
        """Names of the modules whose attributes or tables differ from the snapshot (for tests and errors)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        out = []
        for module, attributes, tables, _ in self.modules:
            state = vars(module)
            same = state.keys() == attributes.keys() and all(_same(state[k], attributes[k]) for k in attributes)
            same = same and all(state[t].keys() == e.keys() and all(state[t][k] is v for k, v in e.items())
                                for t, e in tables.items())
            if not same:
                out.append(names.get(id(module), type(module).__name__))
        return out


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and type(a) in (int, float, bool, str, tuple) and a == b)
