"""The run check: a model pruned in place must run as the user runs it, and compute what the pruned graph computes.

A head count left stale can still run, on empty slices, and compute something else; so the model's first
floating-point output is compared with the verified pruned graph's on the same inputs.

Example::

    >>> check_runs(model, (ids,), expected=pruned_graph(ids))    # raises FxPruneError naming the difference
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError


def check_runs(model: nn.Module, example_inputs, kwargs=None, expected=None) -> None:
    """Run the pruned model as the user will: plain forward, and ``generate`` with a cache where it exists.

    ``expected``: the pruned graph's output on the same inputs; the model's first floating-point output must
    match it (a head count left stale can still run, on empty slices, and compute something else).
    """
    kwargs = dict(kwargs or {})
    kwargs.pop("use_cache", None)
    with torch.no_grad():
        try:
            got = model(*example_inputs, **kwargs)
            if hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
                ids = example_inputs[0] if example_inputs else kwargs["input_ids"]  # keyword inputs: a dict
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                               pad_token_id=0)
        except Exception as exc:  # name the failure for the user; this is a bug in attribute updating
            raise FxPruneError(f"the model pruned in place no longer runs: {type(exc).__name__}: {exc}") from exc
    if expected is not None and not model.training:
        got, expected = _first_float(got), _first_float(expected)
        if got is not None and expected is not None and got.shape == expected.shape:
            # the same aten ops on the same weights: a stale head count moves outputs by their own size,
            # rounding by far less (sqrt(eps) of the dtype: 1e-3 in float32, 0.09 in bfloat16)
            scale = max(expected.abs().max().item(), 1.0)
            tolerance = max(1e-3, torch.finfo(expected.dtype).eps ** 0.5) * scale
            error = (got.float() - expected.float()).abs().max().item()
            if error > tolerance:
                raise FxPruneError(f"the model pruned in place computes something else than the pruned graph "
                                   f"(largest difference {error:.3g}, allowed {tolerance:.3g}): an attribute of "
                                   f"{type(model).__name__} that restates a pruned width was not updated")


def _first_float(output):
    leaves = torch.utils._pytree.tree_leaves(output)
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
