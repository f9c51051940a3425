"""The pruned graph's tensors set into the caller's module tree, by qualified name.

Both captures name a graph's tensors by the caller's qualified names: ``get_attr`` targets of a symbolically
traced graph are module paths of the caller, and ``torch.export``'s unlifted module registers every parameter,
buffer and tensor constant under the name the caller's module tree gives it (``sub.l.weight``, ``sub.plain``).
Rewriting a copy of the graph replaces each resized tensor by a new one under the same name, so a tensor of the
caller whose shape differs from the pruned graph's tensor of the same name is replaced by it, in its owner:

- a parameter stays an ``nn.Parameter`` with its ``requires_grad`` (set with ``setattr``: RNN modules refresh
  their flat weights then);
- a buffer stays a buffer, persistent or not (``_non_persistent_buffers_set`` is left alone);
- a plain tensor attribute (a tensor kept on ``self`` without registering it) stays a plain attribute;
- tensors tied under several names (an embedding and an output projection sharing one weight) stay one tensor.

Example::

    >>> changed = write_tensors(model, pruned)
    >>> changed["blocks.0.mlp.fc1.weight"]
    ((384, 192), (264, 192))
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.dotted import owner_of


def tensors_by_name(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``module``'s tree under each of its names
    (``{"blocks.0.norm1.weight": tensor, ...}``; tied tensors appear under every name)."""
    out = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for key, value in m._parameters.items():
            if value is not None:
                out[dot + key] = value
        for key, value in m._buffers.items():
            if value is not None:
                out[dot + key] = value
        for key, value in vars(m).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                out.setdefault(dot + key, value)
    return out


def parameters_and_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters and buffers of ``module`` (a tied tensor under its first name)."""
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def write_tensors(model: nn.Module, pruned: nn.Module) -> dict[str, tuple]:
    """Set every tensor of ``pruned`` whose shape differs from ``model``'s tensor of the same name into
    ``model`` (see module docstring). Returns ``{name: (old shape, new shape)}`` of those set."""
    mine, theirs = tensors_by_name(model), tensors_by_name(pruned)
    made: dict[int, torch.Tensor] = {}  # one new tensor per tensor of the pruned graph: ties stay ties
    changed = {}
    for name, new in theirs.items():
        old = mine.get(name)
        if old is None or old.shape == new.shape:
            continue
        changed[name] = (tuple(old.shape), tuple(new.shape))
        made[id(new)] = set_tensor(model, name, new, made.get(id(new)))
    return changed


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, made: torch.Tensor | None = None) -> torch.Tensor:
    """Put ``tensor`` into ``model`` under the qualified ``name``, as what the old tensor there was (parameter,
    buffer, plain attribute); ``made``: the object a tie of ``name`` already received, reused. Returns the
    object set."""
    module, attr = owner_of(model, name)
    if attr in module._parameters:
        old = module._parameters[attr]
        if not isinstance(made, nn.Parameter):
            made = nn.Parameter(tensor.detach(), requires_grad=old.requires_grad if old is not None else True)
        setattr(module, attr, made)
    elif attr in module._buffers:
        made = tensor.detach() if made is None else made
        setattr(module, attr, made)
    else:
        made = tensor.detach() if made is None else made
        vars(module)[attr] = made
    return made


def changed_widths(changed: dict[str, tuple], prefix: str | None = None) -> dict[int, set]:
    """``{old size: new sizes}`` over every axis that changed size in ``changed`` (from :func:`write_tensors`),
    for the tensors under module ``prefix`` only when given (``""``: all).

    Example: a hidden size 64 -> 48 and an MLP width 128 -> 96 give ``{64: {48}, 128: {96}}``.
    """
    out: dict[int, set] = {}
    for name, (old, new) in changed.items():
        if prefix and not name.startswith(prefix + "."):
            continue
        if len(old) != len(new):
            continue
        for a, b in zip(old, new):
            if a != b:
                out.setdefault(int(a), set()).add(int(b))
    return out
