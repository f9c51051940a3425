"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

The graph is analysed through ``torch.export`` like any other; the pruned tensors
are then written back into the original module tree by name, module attributes
are updated from the new shapes and from the head counts of the rewritten graph's
attention calls (:mod:`fxprune.huggingface.attention_sites`: fused q|k|v projections under any
name), and ``model.config`` is updated where widths are uniform across layers;
config fields derived from a pruned width are found by rebuilding the model from
the config on the meta device (:mod:`fxprune.huggingface.rebuild`). Whatever a model built
from the config would still get wrong (per-layer widths; GPT-2, whose attention
width is tied to ``n_embd``; Gemma's ``embed_scale``, sqrt of the original width)
is stored in ``config.fxprune_shapes`` / ``fxprune_attributes`` / ``fxprune_buffers``,
and :func:`load_pretrained` rebuilds the model with them. If the pruned model does
not run, or computes something else than the pruned graph, the original tensors,
attributes and config are put back.

One ``head_dim`` attribute serves q, k and v in HF attention, and RoPE's
``inv_freq`` is recomputed from the config when a model is reloaded, so head
dimensions are kept whole in place (heads, kv groups, MLP units and the hidden
size are pruned).

The work is split by job: :mod:`~fxprune.huggingface.freezes` (what analysis keeps whole for an in-place
pruning), :mod:`~fxprune.huggingface.write_back` (tensors by name), :mod:`~fxprune.huggingface.attributes`
(module attributes from the new shapes), :mod:`~fxprune.huggingface.config_update` (config fields, rebuilds,
records), :mod:`~fxprune.huggingface.run_check` (the pruned model runs and computes what the graph computes)
and :mod:`~fxprune.huggingface.snapshot` (everything put back when a step fails); :func:`prune_in_place` runs
them in that order. Attention modules are found from the graph (:mod:`~fxprune.huggingface.attention_sites`);
the attribute-name lists of :mod:`~fxprune.huggingface.attention_names` are the fallback.

Example::

    >>> model = LlamaForCausalLM(config).eval()
    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.generate(ids, max_new_tokens=20)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""

from __future__ import annotations

import torch

from fxprune.errors import FxPruneError
from fxprune.huggingface.attention_sites import attention_sites, update_head_counts
from fxprune.huggingface.config_update import unfollow, update_config
from fxprune.huggingface.restated_sizes import attributes_from_constants
from fxprune.huggingface.run_check import check_runs
from fxprune.huggingface.snapshot import restore, snapshot
from fxprune.huggingface.write_back import tensors_by_name, write_back


def prune_in_place(dg, removal: dict, rewrite, verify, run: bool = True):
    """Prune ``dg.model`` itself: rewrite a copy, verify it, write it back, update attributes and config.

    ``run=False`` skips running the result (forward and ``generate``): a model on the meta device, which
    :func:`fxprune.prune_checkpoint` resizes for its shapes and config, cannot run; its shapes are still
    verified. ``dg.config_fit`` (:class:`fxprune.huggingface.portable.Fit`, ``portable=True``): the config values
    the plan was made for, set before the config is checked against a rebuild.
    """
    model = dg.model
    original = {name: tuple(t.shape) for name, t in tensors_by_name(model).items()}
    pruned = rewrite(dg, removal, inplace=False, share_tensors=True)
    verify(pruned, dg.example_inputs, dg.expected_shapes)  # propagates the new shapes into pruned's nodes
    before, after = attention_sites(dg.gm), attention_sites(pruned)
    kwargs = {k: v for k, v in (dg.model_kwargs or {}).items() if k != "use_cache"}
    expected = None
    try:  # what the model must compute once written back (the pruned graph was verified)
        if run:
            with torch.no_grad():
                expected = pruned(*(dg.model_inputs or ()), **kwargs)
    except Exception:  # a graph that takes its inputs otherwise: the model is still run, not compared
        expected = None
    saved = snapshot(model)
    try:
        write_back(model, pruned, clone=False)  # the resized tensors are fresh copies that only `pruned` holds
        update_head_counts(model, before, after)
        decided = attributes_from_constants(model, dg.gm, pruned, {(id(m), attr): value for m, _, _, plain in saved[0]
                                                                    for attr, value in plain.items()})
        followed = update_config(model, original, dg, removal,
                                 {p: (before[p], after[p]) for p in before.keys() & after.keys()}, decided,
                                 fitted=dg.config_fit.values if dg.config_fit is not None else None)
        if run:
            try:
                check_runs(model, dg.model_inputs, dg.model_kwargs, expected)
            except FxPruneError:
                if not followed:
                    raise
                unfollow(model, followed)  # the rebuild's values were wrong guesses for this model: its own back
                check_runs(model, dg.model_inputs, dg.model_kwargs, expected)
    except Exception as exc:  # a model that no longer runs is never left behind: put the original back
        restore(model, saved)
        uneven = _uneven_head_counts(after)
        if uneven:  # say why: the likeliest cause, and what works instead
            raise FxPruneError(f"{exc} (the original was put back). The plan leaves attention modules with "
                               f"different head counts ({uneven}); {type(model).__name__} fails or computes "
                               f"something else with them, so its forward most likely reads a head count from "
                               f"the config all layers share rather than from each module (Phi-3, for one, "
                               f"slices q|k|v at config.num_attention_heads * head_dim). Prune heads by the same "
                               f"amount in every layer, or without inplace=True") from exc
        if isinstance(exc, FxPruneError):
            raise
        raise FxPruneError(f"pruning {type(model).__name__} in place failed while writing back its tensors, "
                           f"attributes and config (the original was put back): {type(exc).__name__}: {exc}") from exc
    return model


def _uneven_head_counts(sites: dict) -> str:
    """``"model.layers.0.self_attn: 1 heads / 1 kv heads, ..."`` when attention modules of the pruned graph
    keep different head counts, else ``""``."""
    counts = {(site.heads, site.kv_heads) for site in sites.values()}
    if len(counts) < 2:
        return ""
    return ", ".join(f"{path}: {site.heads} heads / {site.kv_heads} kv heads" for path, site in sorted(sites.items()))
