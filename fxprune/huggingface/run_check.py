"""The run check a Hugging Face model pruned in place adds to the generic one: ``generate`` with a cache.

The comparison of the model's own forward with the pruned graph is the generic one
(:mod:`fxprune.rewriting.inplace.check`: every output tensor, shapes and values, at two batch sizes, nothing
skipped); the forward runs there without a cache, as the graph was captured. :func:`generates` adds what the
graph cannot show: a causal language model still generates with its key/value cache, whose shapes follow the
pruned head counts.

Example::

    >>> generates(model, (ids,))          # raises FxPruneError naming the failure
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError


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
