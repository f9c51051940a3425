"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

A transformers model is captured through ``torch.export`` (mixture-of-experts blocks with a fixed-op
implementation, :mod:`fxprune.analysis.experts_capture`) and pruned like any graph; with ``inplace=True``
analysis first freezes what the model's own forward cannot express (:mod:`~fxprune.huggingface.freezes`), and the
model is pruned in place by the mechanism every model is (:mod:`fxprune.rewriting.inplace`: tensors by name,
widths, the model's own forward checked against the pruned graph, everything put back on failure), with
:class:`~fxprune.huggingface.inplace.HuggingFace` on top: attributes of transformers modules
(:mod:`~fxprune.huggingface.attributes`; expert blocks and routers: :mod:`~fxprune.huggingface.experts`; head
counts of the attention modules the graph finds, :mod:`fxprune.analysis.attention_sites`), the config, finding
fields derived from a pruned width by rebuilding the model on the meta device
(:mod:`~fxprune.huggingface.config_update`, :mod:`~fxprune.huggingface.rebuild`), and ``generate``
(:mod:`~fxprune.huggingface.run_check`). The attribute-name lists used where the graph does not say are a
fallback, kept in :mod:`~fxprune.huggingface.attention_names`. :func:`load_pretrained`
(:mod:`~fxprune.huggingface.loading`) reloads what the config alone cannot describe, building it on the meta
device. It may import ``fxprune.errors``, ``fxprune.modules``, ``fxprune.algebra``, ``fxprune.rules``,
``fxprune.analysis``, ``fxprune.importance``, ``fxprune.planning``, ``fxprune.rewriting`` and
``fxprune.calibration``; the pipeline calls it. Example::

    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.save_pretrained(out)
    >>> fxprune.load_pretrained(out).generate(ids, max_new_tokens=20)
"""

from fxprune.huggingface.loading import load_pretrained

__all__ = ["load_pretrained"]
