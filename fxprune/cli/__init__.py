"""The command line (``fxprune prune|inspect|...``) and what only it needs.

:mod:`~fxprune.cli.commands` parses the arguments and runs the public API (``fxprune.prune``, ``fxprune.load``,
``fxprune.prune_checkpoint`` ...), :mod:`~fxprune.cli.model_spec` turns a model spec (``torchvision:resnet50``,
``hf:folder``, ``pkg.module:factory``) into a model and example inputs, :mod:`~fxprune.cli.comparison` measures
parameters, MACs and latency before and after, and :mod:`~fxprune.cli.drawing` draws the dependency groups. The
command line is a client of the library: it may import anything in ``fxprune`` (the package itself included);
nothing in the library imports it.
"""

from fxprune.cli.commands import main

__all__ = ["main"]
