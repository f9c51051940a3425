"""``fxprune.report(before, after, example_inputs)``: per-module widths, parameters and MACs, before and after.

Modules are matched by name (pruning keeps module names). A module's MACs are
those of the ops that run inside it (``nn_module_stack``), its parameters those
it owns directly; its width is ``in -> out`` (channels, features, or the weight's
first two dimensions). Modules that own no parameters and count no MACs are
left out; the last row is the whole model.

Example::

    >>> text = fxprune.report(model, pruned, (x,))
    module            type        width before   width after   params before  params after  MACs before  MACs after
    conv1             Conv2d          3 -> 64       3 -> 32          9.41K         4.70K      118.01M      59.01M
    ...
    (total)                                                         25.56M         6.92M        4.11G       1.05G
"""

from __future__ import annotations


import torch
import torch.nn as nn

from fxprune.analysis.macs import counted_graph, module_counts


def report(before, after, example_inputs, *, show: bool = True) -> str:
    """The table as text; printed too unless ``show=False``."""
    rows_before, total_before = _measure(before, example_inputs)
    rows_after, total_after = _measure(after, example_inputs)
    names = list(rows_before) + [n for n in rows_after if n not in rows_before]
    header = ("module", "type", "width before", "width after", "params before", "params after", "MACs before",
              "MACs after")
    lines = []
    for name in names:
        b, a = rows_before.get(name), rows_after.get(name)
        kind = (b or a)["type"]
        lines.append((name, kind, _get(b, "width"), _get(a, "width"), _num(b, "params"), _num(a, "params"),
                      _num(b, "macs"), _num(a, "macs")))
    lines.append(("(total)", "", "", "", _human(total_before[1]), _human(total_after[1]), _human(total_before[0]),
                  _human(total_after[0])))
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths))) for row in [header] + lines)
    if show:
        print(text)
    return text


def _measure(model, example_inputs) -> tuple[dict, tuple[int, int]]:
    gm = counted_graph(model, example_inputs)
    counts = module_counts(gm)
    modules = dict(gm.named_modules())
    rows = {name: {"type": type(modules[name]).__name__ if name in modules else "", "params": params, "macs": macs,
                   "width": _width(modules[name]) if name in modules else ""}
            for name, (macs, params) in counts.items() if name}
    total_params = sum(params for _, params in counts.values())
    return rows, (sum(macs for macs, _ in counts.values()), total_params)


def _width(module: nn.Module) -> str:
    for a, b in (("in_channels", "out_channels"), ("in_features", "out_features"), ("embed_dim", "embed_dim"),
                 ("input_size", "hidden_size")):
        if hasattr(module, a) and hasattr(module, b):
            return f"{getattr(module, a)} -> {getattr(module, b)}"
    if hasattr(module, "num_features"):
        return str(module.num_features)
    if isinstance(module, nn.LayerNorm):
        return "x".join(str(s) for s in module.normalized_shape)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
        return "x".join(str(s) for s in weight.shape)
    return ""


def _get(row, key) -> str:
    return "-" if row is None else str(row[key])


def _num(row, key) -> str:
    return "-" if row is None else _human(row[key])


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
