"""What analysis keeps whole when the model is to be pruned in place: values its own forward recomputes.

The pruned graph stores the kept values of a tensor the forward computes from constants
(:mod:`fxprune.rules.constants`: BLOOM's ALiBi slope of each kept head), but a model pruned in place runs its own
forward again, which recomputes the tensor from its attributes and config: ``_get_alibi_slopes(n_head)`` for
fewer heads gives the kept heads other slopes, so the model would compute something else. Those axes are frozen
in place; graph-level pruning (``inplace=False``) keeps them prunable. The ``solve`` pass calls this.

Example::

    >>> dg = fxprune.analyze(bloom, (ids,), inplace=True)
    >>> [g.frozen[0] for g in dg.groups if g.frozen and "computed in forward" in g.frozen[0]][:1]
    ['computed in forward from constants (a model pruned in place recomputes it ...): node 'pow' ...']
"""

from __future__ import annotations

from fxprune.errors import describe_node


def freeze_computed_constants(dg) -> None:
    """Axes of tensors the forward computes from constants keep all their units (see module docstring)."""
    for layout, node in dg.state.sliced_constants:
        reason = (f"computed in forward from constants (a model pruned in place recomputes it from its config, "
                  f"not the kept values; inplace=False prunes it): {describe_node(node)}")
        for group in dg.groups_of_layout(layout):
            if not group.frozen:  # positions of a static capture are frozen already (graph input)
                group.frozen.append(reason)


def freeze_module(dg, path: str, reason: str) -> list:
    """Freeze every prunable group with a parameter or buffer in module ``path`` (its subtree; ``""``: the whole
    model), giving ``reason``; returns the groups frozen.

    For the retry after an in-place failure inside that module's own forward: the model's code ties widths the
    captured graph keeps apart (YOLO11's attention views its output by its input's channel count, ``x.view(B, C,
    H, W)``, which an exported graph holds as a constant), so the widths the module touches stay whole.
    """
    prefix = f"{path}." if path else ""
    frozen = []
    for group in dg.prunable_groups:
        if any(m.kind in ("parameter", "buffer") and m.name.startswith(prefix) for m in group.members):
            group.frozen.append(reason)
            frozen.append(group)
    return frozen
