"""Calibration on activations: statistics of the inputs of every layer that consumes a prunable group,
criteria that read them (``"activation"``, FLAP's fluctuation; ``"wanda"``; ``"obs"``, structured Optimal
Brain Surgeon: the output error left after refitting without the unit) and the least-squares refit of
the consumers' kept columns after pruning (``fxprune.prune(..., reconstruct=True)``), so that a pruned
model keeps much of its accuracy without retraining. Calibration batches (a tensor, a tuple of positional
inputs or a dict of keyword inputs each) run once through the analysed graph (``dg.gm``, real weights) in an
fx Interpreter; per consumer weight, float64 sums of the inputs, of their squares and (for reconstruction)
the Gram matrix with a constant column are accumulated on the activations' device, never the activations.
Calibrated consumers (:mod:`fxprune.calibration.consumers`): Linear layers (``nn.Linear``, ``F.linear``,
``aten.linear``), matmuls with a weight operand (``x @ W``, ``mm``, ``addmm``: GPT-2's ``Conv1D``; ``x @ W.T``),
1-d, 2-d and 3-d convolutions through their patches, grouped ones block by block. Depthwise and transposed
convolutions, batched matmuls (other than of gathered expert weights) and computed weights are not;
mixture-of-experts weights are, expert by expert on the tokens routed to each. Criteria use weights only for
groups without a calibrated consumer (with a warning) and reconstruction leaves those layers as they are.
With ``inplace=True`` a Hugging Face model gets the refit weights by parameter name. ``sequential=True``
refits the consumers front to back on the pruned model's own inputs (:mod:`fxprune.calibration.sequential`);
``reestimate_bn=True`` re-estimates the pruned model's BatchNorm running statistics
(:mod:`fxprune.calibration.batchnorm`). After pruning, :func:`distill` trains the pruned model a short while
to match the original on the same batches (:mod:`fxprune.calibration.distill`). Its criteria register
themselves in :mod:`fxprune.importance`; it may import ``fxprune.errors``, ``fxprune.modules``,
``fxprune.algebra``, ``fxprune.rules``, ``fxprune.analysis``, ``fxprune.importance``, ``fxprune.planning`` and
``fxprune.rewriting``; the pipeline calls it.

Example::

    >>> batches = [x[i:i + 32] for i in range(0, 512, 32)]
    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="activation",
    ...                        calibration=batches, reconstruct=True, sequential=True, reestimate_bn=True)

``importance="obs"`` ranks units by what the refit cannot recover, from the same Gram matrices as the
refit (one pass over the batches for both)::

    >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x[:1],), importance="obs",
    ...                        calibration=batches, reconstruct=True)
    >>> fxprune.distill(pruned, model, batches, steps=100).last_loss
"""

from fxprune.calibration.batchnorm import reestimate_batchnorm
from fxprune.calibration.consumers import Consumer, calibrated_consumers
from fxprune.calibration.criteria import Activation, Wanda
from fxprune.calibration.distill import DistillResult, distill, distill_loss
from fxprune.calibration.obs import OBS, OutputOBS, damped_inverse, obs_scores
from fxprune.calibration.reconstruct import load_refit, reconstruct, refit, refit_consumers
from fxprune.calibration.sensitivity import output_sensitivity
from fxprune.calibration.sequential import plan_sequential, reconstruct_sequential, run_sequential, stages_of
from fxprune.calibration.statistics import ExpertStats, InputStats, collect_statistics

__all__ = ["Activation", "Consumer", "DistillResult", "ExpertStats", "InputStats", "OBS", "OutputOBS", "Wanda",
           "calibrated_consumers", "collect_statistics", "damped_inverse", "distill", "distill_loss", "load_refit",
           "obs_scores", "output_sensitivity", "plan_sequential", "reconstruct", "reconstruct_sequential",
           "reestimate_batchnorm", "refit", "refit_consumers", "run_sequential", "stages_of"]
