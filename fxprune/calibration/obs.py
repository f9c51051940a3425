"""``"obs"``: structured Optimal Brain Surgeon, the output error a unit's removal leaves after the refit.

For a calibrated consumer ``y = W x + b`` let ``Wt = [W, b]`` (out, d + 1), ``G = E[x~ x~^T]`` the Gram
matrix of ``x~ = [x, 1]`` over the calibration tokens and ``H = G + lam I`` with ``lam = damping *
mean(diag G)`` (the damping of :func:`fxprune.calibration.refit`). Removing the columns U that unit u owns
(a Linear's input features of the unit; ``kh * kw`` columns per channel of a convolution; ``head_dim``
columns per attention head) and refitting the other columns and the bias optimally raises the expected
squared output error by::

    dE(U) = trace( Wt[:, U] (Hinv[U, U])^-1 Wt[:, U]^T ),      Hinv = H^-1

(Hassibi & Stork's OBS for a group of columns: Frantar & Alistarh, 2022; Kurtic et al., 2023, ZipLM). A
consumer without a bias uses ``W`` and ``G[:d, :d]`` (there is no constant column to refit); the constant
column is never removed. A unit's score is ``dE`` summed over the group's calibrated consumers. ``H`` is
inverted once per consumer (Cholesky, float64, on the statistics' device), then every unit of the group is one
small ``|U| x |U|`` solve, batched. With ``damping -> 0`` the score is exactly the consumer's output error on
the calibration inputs that ``reconstruct=True`` leaves when the unit alone is removed; so a unit whose
activation copies another unit's (or is constant, with a bias) scores about 0 (exactly 0 as damping -> 0): the
refit moves its column onto the copy. A mixture-of-experts weight is scored per expert, from the Gram of the
tokens routed to it, and the experts' ``dE`` are added weighted by their share of the routed tokens (the
expected error per routed token; an expert no token picked adds nothing). Groups without a calibrated consumer
fall back to L2 magnitude and every group's scores are divided by their mean, as for ``"activation"``.

It reads the Gram matrices that ``reconstruct=True`` reads: ``prune(..., importance="obs",
reconstruct=True)`` runs the calibration batches through the model once.

Example: hidden unit 3 of ``model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))`` copies unit 1
(same weights), so removing it costs nothing once the consumer's column 3 is moved onto column 1::

    >>> with torch.no_grad():
    ...     model[0].weight[3], model[0].bias[3] = model[0].weight[1], model[0].bias[1]
    >>> pruned = fxprune.prune(model, 1 / 6, example_inputs=(x,), importance="obs", calibration=[x],
    ...                        reconstruct=True, round_to=1)            # removes unit 1 or 3
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.calibration.criteria import ActivationCriterion, unit_columns
from fxprune.calibration.reconstruct import DAMPING
from fxprune.importance import register_criterion


def damped_inverse(gram: torch.Tensor, damping: float = DAMPING, name: str = "") -> torch.Tensor:
    """``(G + lam I)^-1`` with ``lam = damping * mean(diag G)``, by Cholesky (float64).

    Example::

        >>> damped_inverse(torch.eye(2, dtype=torch.float64), damping=1.0).diagonal()   # (I + I)^-1
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    gram = gram.double()
    lam = damping * gram.diagonal().mean().clamp_min(1e-300)
    factor, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
    if info.item() != 0:
        raise ValueError(f"importance 'obs': the Gram matrix of the inputs of {name or 'a consumer'} is singular "
                         f"with damping={damping}; use a larger damping (OBS(batches, damping=1e-3))")
    return torch.cholesky_inverse(factor)


def obs_scores(weight: torch.Tensor, bias: torch.Tensor | None, hinv: torch.Tensor,
               columns: np.ndarray) -> np.ndarray:
    """Per row u of ``columns`` (units, k), ``dE`` of removing those columns of ``weight`` (out, d).

    ``hinv`` is :func:`damped_inverse` of the ``(d + 1)`` Gram with a bias, of its ``d x d`` block without.

    Example: with uncorrelated unit-variance inputs (no bias, no damping) a column costs its squared norm::

        >>> obs_scores(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), None, torch.eye(2, dtype=torch.float64),
        ...            np.array([[0], [1]]))
        array([10.,  4.])
    """
    dev = hinv.device
    w = weight.detach().double().to(dev)
    if bias is not None:
        w = torch.cat([w, bias.detach().double().to(dev)[:, None]], 1)
    if columns.shape[1] == 0:
        return np.zeros(len(columns))
    cols = torch.as_tensor(columns, device=dev)
    block = hinv[cols[:, :, None], cols[:, None, :]]  # (units, k, k): Hinv[U, U] of every unit
    owned = w[:, cols].permute(1, 2, 0)  # (units, k, out): Wt[:, U]^T
    # trace(A B A^T) with A = Wt[:, U], B = Hinv[U, U]^-1: sum of A^T * (B A^T)
    error = (owned * torch.linalg.solve(block, owned)).sum((1, 2))
    return error.clamp_min(0).cpu().numpy()


@register_criterion("obs")
class OBS(ActivationCriterion):
    """Structured OBS from the calibration Gram matrices; ``damping`` as in :func:`fxprune.calibration.refit`."""

    name = "obs"
    gram = True

    def __init__(self, batches, damping: float = DAMPING, normalizer="mean", progress=None):
        super().__init__(batches, normalizer, progress)
        self.damping, self._inverse = damping, None

    def prepare(self, dg) -> None:
        if self._prepared_for is not dg:
            self._inverse = None
        super().prepare(dg)

    def unit_scores(self, consumer, w, stats, index, tensors):
        bias = tensors[consumer.bias] if consumer.bias else None
        if consumer.blocks != 1:
            return self._per_column(consumer, w, stats, bias)[index].sum(1)
        if consumer.experts:
            return self._per_expert(consumer, w, stats, index)
        name = consumer.weight
        # one inverse at a time: a consumer usually holds one group, and an LLM's d x d inverses do not all fit
        if self._inverse is None or self._inverse[0] != name:
            gram = stats.gram if bias is not None else stats.gram[:-1, :-1]
            self._inverse = (name, damped_inverse(gram, self.damping, name))
        return obs_scores(consumer.matrices(w.detach())[0], bias, self._inverse[1], unit_columns(consumer, index))

    def expert_scores(self, consumer, w, stats) -> np.ndarray:
        """Removing a whole expert (every column, nothing left to refit) costs its output's second moment on
        its tokens, ``trace(M_e G_e M_e^T)``, weighted by its share of the routed tokens."""
        out = []
        for matrix, s, share in zip(consumer.matrices(w.detach()), stats.experts, stats.shares):
            if not s.count:
                out.append(0.0)
                continue
            m = matrix.double().to(s.gram.device)
            out.append(share * float((m @ s.gram[:-1, :-1] * m).sum()))
        return np.array(out)

    def _per_expert(self, consumer, w, stats, index) -> np.ndarray:
        """An expert weight (no bias): each expert's ``dE`` from its own tokens' Gram, weighted by its share."""
        columns, total = unit_columns(consumer, index), np.zeros(len(index))
        for e, (matrix, s, share) in enumerate(zip(consumer.matrices(w.detach()), stats.experts, stats.shares)):
            if s.count:
                hinv = damped_inverse(s.gram[:-1, :-1], self.damping, f"{consumer.weight}[{e}]")
                total += share * obs_scores(matrix, None, hinv, columns)
        return total

    def _per_column(self, consumer, w, stats, bias) -> np.ndarray:
        """A grouped convolution: a unit's columns may spread unevenly over blocks, each with its own Gram, so
        every column is scored alone (OBS of one column: ``||M[:, j]||^2 / Hinv[j, j]``) and a unit's columns are
        summed; per index of the weight's input axis (kernel positions summed)."""
        total = np.zeros(w.shape[consumer.in_axis])
        for b, matrix in enumerate(consumer.matrices(w.detach())):
            gram = stats.block_gram(b) if bias is not None else stats.block_gram(b)[:-1, :-1]
            d = matrix.shape[1]
            hinv = damped_inverse(gram, self.damping, consumer.weight).diagonal()[:d]
            column = matrix.double().square().sum(0).to(hinv.device) / hinv
            total += column.reshape(-1, consumer.kernel).sum(1).cpu().numpy()
        return total
