"""Saving and loading: plans, pruned models, checkpoints.

:mod:`~fxprune.io.jsonvalue` is the JSON codec for the values a plan or a saved graph holds,
:mod:`~fxprune.io.plans` the :class:`~fxprune.io.plans.PruningPlan` the pipeline records (the units removed, the
settings, the example inputs), and :mod:`~fxprune.io.serialize` ``fxprune.save``/``fxprune.load`` of a pruned
GraphModule. These sit below the pipeline (it records plans) and may import ``fxprune.errors``,
``fxprune.algebra`` and ``fxprune.analysis``. Two parts run the pipeline, so they sit above ``fxprune.api`` and
nothing below it may import them: :mod:`~fxprune.io.replay` (a saved plan applied again) and
:mod:`fxprune.io.checkpoint` (``prune_checkpoint``: a Hugging Face checkpoint folder pruned shard by shard). This
``__init__`` imports neither.
"""
