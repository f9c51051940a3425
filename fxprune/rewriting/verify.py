"""Verify: re-propagate shapes through the pruned graph; a model that fails is never returned.

Example: a rewrite that left a hard-coded ``view(-1, 256, 4, 4)`` unchanged
after pruning its input would fail here with the node and source line, instead
of failing later in the user's hands.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.errors import ShapeError
from fxprune.analysis.propagate import propagate


def output_shapes(gm: fx.GraphModule, free=()) -> list:
    """The shape of every graph output, in order; None for the nodes named in ``free`` (their shapes may change:
    :func:`fxprune.analysis.relate.relate`'s ``free_outputs``)."""
    out = gm.graph.find_nodes(op="output")[0]
    shapes = []
    fx.node.map_arg(out.args, lambda n: shapes.append(None if n.name in free else _shape(n.meta.get("val"))) or n)
    return shapes


def _shape(val):
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    if isinstance(val, (tuple, list)):
        return tuple(_shape(v) for v in val)
    return None


def verify(gm: fx.GraphModule, example_inputs, expected_shapes: list) -> None:
    try:
        propagate(gm, example_inputs)
    except ShapeError as exc:
        raise ShapeError(f"the pruned graph is inconsistent ({_culprit(gm)}): {exc}") from exc
    got = output_shapes(gm)
    if len(got) != len(expected_shapes) or any(e is not None and e != g for e, g in zip(expected_shapes, got)):
        raise ShapeError(f"pruning changed the output shapes from {expected_shapes} to {got} ({_culprit(gm)})")


def _culprit(gm: fx.GraphModule) -> str:
    """Who to blame: the rules registered outside fxprune that related this graph, if any (relate marks them)."""
    users = list(dict.fromkeys(n.meta["fxprune_user_rule"] for n in gm.graph.nodes if "fxprune_user_rule" in n.meta))
    if users:
        more = f" and {len(users) - 3} more" if len(users) > 3 else ""
        return f"check the user rule{'s' if len(users) > 1 else ''} {'; '.join(users[:3])}{more}"
    return "a bug in fxprune, please report it"
