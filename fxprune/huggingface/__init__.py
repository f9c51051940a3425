"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

A transformers model is captured through ``torch.export`` (mixture-of-experts blocks with a fixed-op
implementation, :mod:`~fxprune.analysis.experts_capture`) and pruned like any graph; with
``inplace=True`` the pruned tensors are written back into the caller's module tree
(:mod:`~fxprune.huggingface.inplace`), attention modules and their head counts are found from the graph's
attention calls (:mod:`~fxprune.huggingface.attention_sites`), expert blocks and routers follow their tensors
(:mod:`~fxprune.huggingface.experts`), attributes the graph restates as size constants follow the rewritten
graph (:mod:`~fxprune.huggingface.restated_sizes`), config fields derived from a pruned width are found by rebuilding
the model on the meta device (:mod:`~fxprune.huggingface.rebuild`), and :func:`load_pretrained`
(:mod:`~fxprune.huggingface.loading`) reloads what the config alone cannot describe, building it on the meta
device. Example::

    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.save_pretrained(out)
    >>> fxprune.load_pretrained(out).generate(ids, max_new_tokens=20)
"""

from fxprune.huggingface.loading import load_pretrained

__all__ = ["load_pretrained"]
