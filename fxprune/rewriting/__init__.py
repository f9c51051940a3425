"""From a removal plan to a pruned graph that runs.

:mod:`~fxprune.rewriting.rewrite` slices parameters and buffers along the solved layouts and rewrites module
attributes and shape constants; :mod:`~fxprune.rewriting.recompose` puts the module calls analysis decomposed
back as (resized) module calls; :mod:`~fxprune.rewriting.verify` runs the pruned graph and checks its output
shapes. It may import ``fxprune.errors``, ``fxprune.modules``, ``fxprune.algebra``, ``fxprune.rules``,
``fxprune.analysis``, ``fxprune.importance`` and ``fxprune.planning`` (the layers below it); the modules a pruned
graph calls (``PrunedMultiheadAttention``) live in ``fxprune.modules``, below analysis, because capture and
decompose must know them too.
"""
