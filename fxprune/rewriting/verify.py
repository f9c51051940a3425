"""Verify: re-propagate shapes through the pruned graph; a model that fails is never returned.

Example: a rewrite that left a hard-coded ``view(-1, 256, 4, 4)`` unchanged
after pruning its input would fail here with the node and source line, instead
of failing later in the user's hands.

First ``verify_other_sizes``: the graph is propagated at other sizes of its varying input dimensions not yet static
(batch 3, a length one less: ``dynamic.other_sizes``); where that fails (a traced ``x.view(2, -1)``, a size an
export or a rewrite baked in without a guard) those dimensions become static with one warning, their record in
``gm.meta["fxprune_input_shapes"]`` and the check at the graph's entry. Then the shapes are re-propagated at the
example, and a ``ShapeError`` is raised if anything is inconsistent or an output shape changed (except those relate
was told may change: ``None`` in ``expected_shapes``, a Hugging Face model's internal states pruned in place). The
error names the user rules (registered outside ``fxprune.``, marked by relate in ``node.meta["fxprune_user_rule"]``)
that related the graph, else calls it a bug in fxprune.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from fxprune.analysis import dynamic
from fxprune.analysis.propagate import propagate
from fxprune.errors import ShapeError


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


def verify_other_sizes(gm: fx.GraphModule, example_inputs, model_name: str) -> list[dict]:
    """Propagate ``gm`` at other sizes of its input dimensions that vary in use (``gm.meta["fxprune_input_shapes"]``:
    batch, sequence ...) and not yet known static; those where it fails become static: one warning naming them,
    their records marked, a check at the graph's entry. Returns the records made static.

    A size may be fixed by the model's code (a traced ``x.view(2, -1)``), by export without a guard on the
    input (DeBERTa-v2's relative positions under torch 2.6) or by a rewrite; the pruned graph then runs at the
    example's size only, and says so. Run it before :func:`verify`, which leaves the example's shapes in the graph.
    """
    info = gm.meta.get(dynamic.SHAPES_META)
    dims = [r for r in (info or {}).get("dims", []) if not r["static"]]
    if not dims or example_inputs is None:
        return []
    index = {n.name: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    dims = [r for r in dims if r["placeholder"] in index and isinstance(example_inputs[index[r["placeholder"]]],
                                                                         torch.Tensor)]

    def failure(records: list[dict]) -> str | None:
        values = list(example_inputs)
        for r in records:
            i = index[r["placeholder"]]
            values[i] = dynamic.resized(values[i], r["axis"], dynamic.other_sizes(values[i].shape[r["axis"]]))
        try:
            propagate(gm, tuple(values))
        except Exception as exc:  # noqa: BLE001 - any failure at another size means a fixed size
            text = str(exc).strip().splitlines()
            return text[0] if text else type(exc).__name__
        return None

    found = failure(dims)
    if found is None:
        return []
    roles, static = list(dict.fromkeys(r["role"] for r in dims)), []
    for role in roles if len(roles) > 1 else ():  # which of batch, sequence ... is fixed
        group = [r for r in dims if r["role"] == role]
        if failure(group) is not None:
            static += group
    static = static or dims
    why = f"the graph fails at other sizes: {found}"
    for r in static:
        r["static"] = True
    info["shapes"] = "static" if all(r["static"] for r in info["dims"]) else "partly static"
    info["why"] = "; ".join(w for w in (info.get("why"), why) if w)
    gm.meta["fxprune_static_shapes"] = info["why"]
    dynamic.add_size_checks(gm, static, why)
    warnings.warn(f"fxprune: the pruned {model_name} has static shapes on {dynamic.describe(static)}: it takes only "
                  f"these sizes and refuses others at its entry ({why})", stacklevel=4)
    return static


def _culprit(gm: fx.GraphModule) -> str:
    """Who to blame: the rules registered outside fxprune that related this graph, if any (relate marks them)."""
    users = list(dict.fromkeys(n.meta["fxprune_user_rule"] for n in gm.graph.nodes if "fxprune_user_rule" in n.meta))
    if users:
        more = f" and {len(users) - 3} more" if len(users) > 3 else ""
        return f"check the user rule{'s' if len(users) > 1 else ''} {'; '.join(users[:3])}{more}"
    return "a bug in fxprune, please report it"
