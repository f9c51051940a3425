"""Planning: from per-unit scores to the units each group loses, shaped for the hardware that runs the result.

``selection`` ranks units (lowest scores first, per group or globally) and honours
per-group *removal steps*; ``alignment`` derives those steps from the kernels'
preferred channel multiple (8, for tensor cores and as measured on CPUs) so that every pruned weight dimension that was aligned stays aligned;
``ratios`` turns ``ratios={module: r}`` into per-group ratios; ``target`` searches
the ratio that keeps a fraction of the MACs or parameters (globally, ``costs`` gives
what one unit of each group is worth and its type, and ``selection.cost_plan`` spends the
budget where it loses least score per MAC); ``isomorphic`` splits the groups into classes of one
structure (every layer's heads, every same-width MLP) that each lose the ratio, ranked within the class;
``measured`` (``allocation="measured"``) spreads each class's count across layers by measured held-out output
error instead, from probe prunes whose groups ``splice`` puts alone into the original and curves that
``error_curves`` interpolates and allocates (the caller prunes and measures: planning stays below calibration);
``latency`` measures
per-layer latency tables on the model's device and ``latency_target`` searches
the plan that reaches a latency target with the least importance lost. For
example, ``prune(llama, 0.3)`` keeps 2864 of 4096 hidden channels (a multiple of
8), not 2867, and leaves every head's width whole. ``planner.make_plan`` is the one entry point over the
planners; ``interactive`` hands the scores to the caller, who chooses. Planning may import ``fxprune.errors``,
``fxprune.modules``, ``fxprune.algebra``, ``fxprune.rules``, ``fxprune.analysis`` and ``fxprune.importance``;
never rewriting, calibration or the pipeline.
"""
