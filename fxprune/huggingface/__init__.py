"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

A transformers model is captured through ``torch.export`` (mixture-of-experts blocks with a fixed-op
implementation, :mod:`fxprune.analysis.experts_capture`) and pruned like any graph; with ``inplace=True``
analysis first freezes what the model's own forward cannot express (:mod:`~fxprune.huggingface.freezes`), and
:func:`~fxprune.huggingface.inplace.prune_in_place` then writes the pruned tensors back into the caller's module
tree (:mod:`~fxprune.huggingface.write_back`), recomputes module attributes from them
(:mod:`~fxprune.huggingface.attributes`; expert blocks and routers: :mod:`~fxprune.huggingface.experts`; head
counts from the graph's attention calls: :mod:`~fxprune.huggingface.attention_sites`; attributes the graph
restates as size constants: :mod:`~fxprune.huggingface.restated_sizes`), updates the config, finding fields
derived from a pruned width by rebuilding the model on the meta device (:mod:`~fxprune.huggingface.config_update`,
:mod:`~fxprune.huggingface.rebuild`), checks that the model runs and computes what the pruned graph computes
(:mod:`~fxprune.huggingface.run_check`), and puts everything back when a step fails
(:mod:`~fxprune.huggingface.snapshot`). The attribute-name lists that find attention where the graph does not
are a fallback, kept in :mod:`~fxprune.huggingface.attention_names`. :func:`load_pretrained`
(:mod:`~fxprune.huggingface.loading`) reloads what the config alone cannot describe, building it on the meta
device. It may import ``fxprune.errors``, ``fxprune.modules``, ``fxprune.algebra``, ``fxprune.rules``,
``fxprune.analysis``, ``fxprune.importance``, ``fxprune.planning``, ``fxprune.rewriting`` and
``fxprune.calibration`` (today it needs only the first three); the pipeline calls it. Example::

    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.save_pretrained(out)
    >>> fxprune.load_pretrained(out).generate(ids, max_new_tokens=20)
"""

from fxprune.huggingface.loading import load_pretrained

__all__ = ["load_pretrained"]
