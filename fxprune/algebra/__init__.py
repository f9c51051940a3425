"""The axis algebra, the base every stage builds on.

:mod:`~fxprune.algebra.layout` says how a tensor axis is laid out from atoms (``Atom``, ``Cat``, ``Prod``) and
solves the relations between layouts (``Solver``); :mod:`~fxprune.algebra.context` is what a rule sees of one
graph node (``RuleContext``, ``TensorRef``) and the analysis state it writes into. Rules state relations in this
algebra, analysis solves them into groups, planning and rewriting read the solved layouts. It may import only
``fxprune.errors`` (and torch): rules import it, so it must never climb into analysis.
"""
