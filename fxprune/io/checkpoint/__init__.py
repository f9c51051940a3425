"""Checkpoint streaming: prune a Hugging Face checkpoint folder that need not fit in memory.

The model is built and analysed on the meta device from ``config.json``; units are scored by a
magnitude criterion reading the ``*.safetensors`` shards one memory-mapped tensor at a time
(:mod:`~fxprune.io.checkpoint.shards`, :mod:`~fxprune.io.checkpoint.scores`) and planned as :func:`fxprune.prune`
plans them; the pruned tensors are then written shard by shard with huggingface_hub's sharding and an updated
``config.json`` (:mod:`~fxprune.io.checkpoint.writer`, :mod:`~fxprune.io.checkpoint.streaming`), so
``from_pretrained`` (or ``fxprune.load_pretrained`` when widths differ per layer) loads the result. Peak memory is
about one shard plus one tensor, whatever the model size. With calibration batches, data-aware criteria and the
sequential refit run the model one decoder layer at a time from the shards (:mod:`~fxprune.io.checkpoint.blocks`,
:mod:`~fxprune.io.checkpoint.layerwise`): about one layer's weights, the batches' hidden states and one layer's
statistics. It runs the pipeline (``fxprune.pipeline``, the checks of ``fxprune.api``), so it sits above them: it may
import anything below ``fxprune.api``; only the package root and the command line import it.

Example::

    >>> plan = fxprune.prune_checkpoint("llama-7b", "llama-7b-pruned", ratio=0.3)
    >>> plan.save("llama-7b-pruned/plan.json")
    >>> fxprune.prune_checkpoint("llama-7b", "llama-7b-refit", ratio=0.3, importance="activation",
    ...                          calibration=batches, reconstruct=True)
"""

from fxprune.io.checkpoint.streaming import meta_model, prune_checkpoint
from fxprune.io.checkpoint.shards import Checkpoint
from fxprune.io.checkpoint.writer import write_shards

__all__ = ["Checkpoint", "meta_model", "prune_checkpoint", "write_shards"]
