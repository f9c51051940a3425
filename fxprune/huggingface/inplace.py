"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

The mechanism is the one every model is pruned in place with (:mod:`fxprune.rewriting.inplace`): the pruned
graph's tensors written into the caller's module tree by name, torch modules' widths, ``nn.MultiheadAttention``
(SigLIP's pooling head), integer attributes the rewritten graph decides or that follow a pruned width, the
caller's own forward compared with the pruned graph at two batch sizes, everything put back on failure. This
layer, :class:`HuggingFace`, adds what only transformers models have:

- attributes: transformers' ``Conv1D`` and mixture-of-experts modules, and head counts of the attention modules
  the graph calls attention in (:mod:`fxprune.analysis.attention_sites`; the attribute-name fallback of
  :mod:`~fxprune.huggingface.attention_names`, :mod:`~fxprune.huggingface.attributes`);
- ``model.config`` updated where widths are uniform across layers, fields derived from a pruned width found by
  rebuilding the model from the config on the meta device, and whatever a model built from the config would
  still get wrong recorded for :func:`load_pretrained` (:mod:`~fxprune.huggingface.config_update`); the config
  is saved and put back with the model;
- the run check compares the forward without a cache (the graph's), then runs ``generate`` with one
  (:mod:`~fxprune.huggingface.run_check`);
- a failure on a plan with uneven head counts names the likeliest cause (Phi-3 reads one count for all layers).

One ``head_dim`` attribute serves q, k and v in HF attention, and RoPE's ``inv_freq`` is recomputed from the
config when a model is reloaded, so head dimensions are kept whole in place (:mod:`~fxprune.huggingface.freezes`).

Example::

    >>> model = LlamaForCausalLM(config).eval()
    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True) is model
    True
    >>> model.generate(ids, max_new_tokens=20)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""

from __future__ import annotations

import torch.nn as nn

from fxprune.analysis.attention_sites import attention_sites, update_head_counts
from fxprune.huggingface.attributes import update_attributes
from fxprune.huggingface.config_fields import set_fields
from fxprune.huggingface.config_update import unfollow, update_config
from fxprune.huggingface.run_check import generates
from fxprune.rewriting.inplace import Change, Extension
from fxprune.rewriting.inplace import prune_in_place as _prune_in_place
from fxprune.rewriting.inplace.tensors import parameters_and_buffers


class HuggingFace(Extension):
    """The Hugging Face layer on top of in-place pruning (see module docstring)."""

    restate_unchanged = False  # attributes follow a rebuild from the updated config instead (config_update)

    def __init__(self, dg, removal: dict) -> None:
        self.dg, self.removal = dg, removal
        self.original = {name: tuple(t.shape) for name, t in parameters_and_buffers(dg.model).items()}
        self.before = attention_sites(dg.gm)
        self.after: dict = {}

    def objects(self, model: nn.Module) -> tuple:
        return (getattr(model, "config", None),)

    def model_kwargs(self, kwargs: dict) -> dict:
        return {**kwargs, "use_cache": False}  # the graph was captured without a cache

    def graph_kwargs(self, kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if k != "use_cache"}

    def update_attributes(self, change: Change) -> None:
        self.after = attention_sites(change.pruned)
        update_attributes(change.model, sites=set(self.before))
        update_head_counts(change.model, self.before, self.after)

    def update_config(self, change: Change) -> dict:
        sites = {p: (self.before[p], self.after[p]) for p in self.before.keys() & self.after.keys()}
        # torch modules' widths are their tensors': a rebuild's other values are not to be followed
        fit = getattr(self.dg, "config_fit", None)  # portable=True: the values the plan was made for
        return update_config(change.model, self.original, self.dg, self.removal, sites, change.decided | change.owned,
                             fitted=fit.values if fit is not None else None)

    def undo(self, change: Change, guesses: dict) -> None:
        if guesses:
            unfollow(change.model, guesses)  # and records them for load_pretrained

    def check(self, model: nn.Module, inputs: tuple, kwargs: dict) -> None:
        generates(model, inputs, kwargs)

    def explain(self, change: Change, exc: BaseException) -> str:
        uneven = _uneven_head_counts(self.after)
        if not uneven:
            return ""
        return (f"The plan leaves attention modules with different head counts ({uneven}); "
                f"{type(change.model).__name__} fails or computes something else with them, so its forward most "
                f"likely reads a head count from the config all layers share rather than from each module (Phi-3, "
                f"for one, slices q|k|v at config.num_attention_heads * head_dim). Prune heads by the same amount "
                f"in every layer, or without inplace=True")


def prune_in_place(dg, removal: dict, run: bool = True):
    """Prune the Hugging Face model ``dg.model`` itself (see module docstring); returns it.

    ``run=False`` runs nothing (forward, ``generate``): a model on the meta device, which
    :func:`fxprune.prune_checkpoint` resizes for its shapes and config, cannot run; its shapes are still verified.
    ``dg.config_fit`` (:class:`fxprune.huggingface.portable.Fit`, ``portable=True``): the config values the plan
    was made for, set before the config is checked against a rebuild.
    """
    return _prune_in_place(dg, removal, HuggingFace(dg, removal), run=run)


class FittedConfig(Extension):
    """``portable=True`` on a model that is no transformers model but is built from a config registered the
    diffusers way (``register_to_config``): the fitted values (``dg.config_fit``) go into its config, so that
    ``save_pretrained`` writes a ``config.json`` its class's plain ``from_pretrained`` builds the pruned model from.
    The config object is replaced, not edited (``register_to_config`` makes a new ``FrozenDict``), so the
    module snapshot puts the old one back on failure."""

    def __init__(self, dg) -> None:
        self.values = dg.config_fit.values

    def update_config(self, change: Change) -> dict:
        set_fields(change.model, self.values)
        return {}


def _uneven_head_counts(sites: dict) -> str:
    """``"model.layers.0.self_attn: 1 heads / 1 kv heads, ..."`` when attention modules of the pruned graph
    keep different head counts, else ``""``."""
    counts = {(site.heads, site.kv_heads) for site in sites.values()}
    if len(counts) < 2:
        return ""
    return ", ".join(f"{path}: {site.heads} heads / {site.kv_heads} kv heads" for path, site in sorted(sites.items()))
