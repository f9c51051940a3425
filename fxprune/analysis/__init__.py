"""From a model to its dependency groups, and what reads the analysed graph.

The analysis passes, in pipeline order: :mod:`~fxprune.analysis.capture` (torch.fx trace or ``torch.export``;
:mod:`~fxprune.analysis.experts_capture` gives mixture-of-experts blocks fixed ops while exporting),
:mod:`~fxprune.analysis.propagate` (shapes on fake tensors), :mod:`~fxprune.analysis.decompose` (fused modules
into functional ops), :mod:`~fxprune.analysis.relate` (each node's rule states its axis relations) and
:mod:`~fxprune.analysis.depgraph` (the relations solved into groups; :mod:`~fxprune.analysis.untie` gives each
consumer its own copy of a shared computed constant first). Readers of the result:
:mod:`~fxprune.analysis.removal` (a removal plan checked against the groups), :mod:`~fxprune.analysis.shapes`
(sizes now or under a plan), :mod:`~fxprune.analysis.macs` (MAC and parameter counts),
:mod:`~fxprune.analysis.report` (per-module widths before and after) and :mod:`~fxprune.analysis.lineage`
(groups matched across two analyses). It may import ``fxprune.errors``, ``fxprune.modules``, ``fxprune.algebra``
and ``fxprune.rules``; never what plans, rewrites or runs the pipeline.
"""
