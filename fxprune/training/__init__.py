"""Pruning inside a training loop.

:mod:`~fxprune.training.pruner` prunes in steps (``fxprune.Pruner``: re-analyse, score, plan, rewrite; groups
matched across steps by :mod:`fxprune.analysis.lineage`), :mod:`~fxprune.training.regularize` gives the sparsity
regularisers of sparse training, and :mod:`~fxprune.training.masking` is soft pruning (``fxprune.mask``: the
planned units zeroed in place, shapes kept). They drive the pipeline through ``fxprune.pipeline`` and
``fxprune.api``, so they sit above both and may import anything below them; only the package root, the command
line and ``fxprune.testing`` import them.
"""
