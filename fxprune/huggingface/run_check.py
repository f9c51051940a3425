"""The run check of a Hugging Face model pruned in place: its forward as the graph was captured (no cache)
equals the pruned graph's outputs, and ``generate`` runs with a cache.

The comparison itself is the generic one (:mod:`fxprune.rewriting.inplace.check`): every output tensor, shapes
and values, nothing skipped; :func:`check_runs` adds ``generate`` for causal language models, which the graph
cannot show (it was captured without a cache).

Example::

    >>> check_runs(model, (ids,), expected=pruned_graph(ids))    # raises FxPruneError naming the difference
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.rewriting.inplace import check


def check_runs(model: nn.Module, example_inputs, kwargs=None, expected=None) -> None:
    """Run the pruned model as the user will: its forward without a cache, compared with ``expected`` (the pruned
    graph's outputs on the same inputs: every tensor, shapes and values), then ``generate`` with a cache where it
    exists. Without ``expected`` the outputs are not compared, and a warning says so."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "use_cache"}
    try:
        got = check.run(model, tuple(example_inputs), {**kwargs, "use_cache": False})
    except Exception as exc:  # name the failure for the user; this is a bug in attribute updating
        raise FxPruneError(f"the model pruned in place no longer runs: {type(exc).__name__}: {exc}") from exc
    if expected is None:
        warnings.warn(f"fxprune: {type(model).__name__} pruned in place runs, but its outputs were not compared "
                      f"with the pruned graph's (none given)", stacklevel=2)
    else:
        problems = check.compare(got, expected)
        if problems:
            raise FxPruneError(f"the model pruned in place computes something else than the pruned graph: "
                               f"{'; '.join(problems[:3])}: an attribute of {type(model).__name__} that restates "
                               f"a pruned width was not updated")
    generates(model, example_inputs, kwargs)


def generates(model: nn.Module, example_inputs, kwargs=None) -> None:
    """``generate`` two tokens with a cache, for a causal language model (the graph was captured without one)."""
    if not (hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")):
        return
    kwargs = kwargs or {}
    ids = example_inputs[0] if example_inputs else kwargs["input_ids"]  # keyword inputs: a dict
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    except Exception as exc:
        raise FxPruneError(f"the model pruned in place no longer generates: {type(exc).__name__}: {exc}") from exc
