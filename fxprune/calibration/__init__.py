"""Calibration on activations: statistics of the inputs of every layer that consumes a prunable group,
criteria that read them (``"activation"``, FLAP's fluctuation; ``"wanda"``) and the least-squares refit of
the consumers' kept columns after pruning (``fxprune.prune(..., reconstruct=True)``), so that a pruned
model keeps much of its accuracy without retraining. Calibration batches (a tensor, a tuple of positional
inputs or a dict of keyword inputs each) run once through the analysed graph (``dg.gm``, real weights) in an
fx Interpreter; per consumer weight, float64 sums of the inputs, of their squares and (for reconstruction)
the Gram matrix with a constant column are accumulated on the activations' device, never the activations.
Linear consumers (``nn.Linear``, ``F.linear``, ``aten.linear``) and ungrouped 2-d convolutions (through
their unfolded patches) are calibrated; grouped/depthwise, 1-d and 3-d convolutions and matmuls with a
weight operand are not, so criteria use weights only for groups without a calibrated consumer and
reconstruction leaves those layers as they are. After pruning, :func:`distill` trains the pruned model a
short while to match the original on the same batches (:mod:`fxprune.calibration.distill`).

Example::

    >>> batches = [x[i:i + 32] for i in range(0, 512, 32)]
    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="activation",
    ...                        calibration=batches, reconstruct=True)
    >>> fxprune.distill(pruned, model, batches, steps=100).last_loss
"""

from fxprune.calibration.consumers import Consumer, calibrated_consumers
from fxprune.calibration.criteria import Activation, Wanda
from fxprune.calibration.distill import DistillResult, distill, distill_loss
from fxprune.calibration.reconstruct import load_refit, reconstruct, refit, refit_consumers
from fxprune.calibration.statistics import InputStats, collect_statistics

__all__ = ["Activation", "Consumer", "DistillResult", "InputStats", "Wanda", "collect_statistics",
           "calibrated_consumers", "distill", "distill_loss", "load_refit", "reconstruct", "refit", "refit_consumers"]
