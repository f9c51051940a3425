"""Checkpoint streaming: prune a Hugging Face checkpoint folder that need not fit in memory.

The model is built and analysed on the meta device from ``config.json``; units are scored by a
magnitude criterion reading the ``*.safetensors`` shards one memory-mapped tensor at a time
(:mod:`fxprune.io.shards`, :mod:`fxprune.io.scores`) and planned as :func:`fxprune.prune` plans them; the
pruned tensors are then written shard by shard with huggingface_hub's sharding and an updated
``config.json`` (:mod:`fxprune.io.writer`, :mod:`fxprune.io.checkpoint`), so ``from_pretrained`` (or
``fxprune.load_pretrained`` when widths differ per layer) loads the result. Peak memory is about one
shard plus one tensor, whatever the model size.

Example::

    >>> plan = fxprune.prune_checkpoint("llama-7b", "llama-7b-pruned", ratio=0.3)
    >>> plan.save("llama-7b-pruned/plan.json")
"""

from fxprune.io.checkpoint import meta_model, prune_checkpoint
from fxprune.io.shards import Checkpoint
from fxprune.io.writer import write_shards

__all__ = ["Checkpoint", "meta_model", "prune_checkpoint", "write_shards"]
