"""Calibration on activations: statistics of the inputs of every layer that consumes a prunable group,
criteria that read them (``"activation"``, FLAP's fluctuation; ``"wanda"``) and the least-squares refit of
the consumers' kept columns after pruning (``fxprune.prune(..., reconstruct=True)``), so that a pruned
model keeps much of its accuracy without retraining. Calibration batches (a tensor, a tuple of positional
inputs or a dict of keyword inputs each) run once through the analysed graph (``dg.gm``, real weights) in an
fx Interpreter; per consumer weight, float64 sums of the inputs, of their squares and (for reconstruction)
the Gram matrix with a constant column are accumulated on the activations' device, never the activations.
Calibrated consumers (:mod:`fxprune.calibration.consumers`): Linear layers (``nn.Linear``, ``F.linear``,
``aten.linear``), matmuls with a weight operand (``x @ W``, ``mm``, ``addmm``: GPT-2's ``Conv1D``; ``x @ W.T``),
1-d, 2-d and 3-d convolutions through their patches, grouped ones block by block. Depthwise and transposed
convolutions, batched matmuls and computed weights are not: criteria use weights only for groups without a
calibrated consumer and reconstruction leaves those layers as they are. With ``inplace=True`` a Hugging Face
model gets the refit weights by parameter name.

Example::

    >>> batches = [x[i:i + 32] for i in range(0, 512, 32)]
    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="activation",
    ...                        calibration=batches, reconstruct=True)
"""

from fxprune.calibration.consumers import Consumer, calibrated_consumers
from fxprune.calibration.criteria import Activation, Wanda
from fxprune.calibration.reconstruct import load_refit, reconstruct, refit, refit_consumers
from fxprune.calibration.statistics import InputStats, collect_statistics

__all__ = ["Activation", "Consumer", "InputStats", "Wanda", "collect_statistics", "calibrated_consumers",
           "load_refit", "reconstruct", "refit", "refit_consumers"]
