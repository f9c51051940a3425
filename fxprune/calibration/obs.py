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

The damping is chosen per consumer by validation (``damping=None``, the default), like the refit's ridge
strength (:mod:`fxprune.calibration.ridge`): for a consumer with a bias, ``H`` is the centred covariance
``C + lam I`` (the bias is refit freely, as ``reconstruct=True`` does), and ``lam = strength * mean(diag C)``
with the strength of :data:`~fxprune.calibration.ridge.GRID` whose single-unit refits, fitted on the training
tokens, best predict the held-out tokens: the sum over units (up to 64, evenly spread over the consumer) of
each unit's held-out error after its refit, relative to its error without refit. A refit of U at strength lam
leaves on a held-out token x the error ``Wt[:, U] Hinv[U, U]^-1 (Hinv (x - mu))_U``, so these errors need only
the rows of ``Hinv`` of the sampled columns: ``2 m d^2`` per strength for m columns, after one eigendecomposition
of ``C``. ``OBS(batches, damping=1e-4)`` fixes it; grouped convolutions and expert weights keep the fixed
default. ``criterion.strengths`` records what was chosen per consumer.

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

import itertools
import math

import numpy as np
import torch

from fxprune.calibration.criteria import ActivationCriterion, unit_columns
from fxprune.calibration.reconstruct import DAMPING, _moments
from fxprune.calibration.ridge import GRID, _about, _centred
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


def validated_damping(weight: torch.Tensor, bias: bool, stats, columns: np.ndarray, sample: int = 64,
                      grid=GRID) -> tuple[float, torch.Tensor]:
    """``(strength, Hinv)`` of one consumer: the strength whose single-unit refits best predict the held-out
    tokens (see the module; ``columns`` (units, k) as for :func:`obs_scores`) and the inverse of the centred
    covariance (bias) or Gram (no bias) of every token damped by it. ``(DAMPING, ...)`` with nothing held out."""
    d = stats.gram_sum.shape[-1] - 1
    every = _moments(stats.gram_sum, stats.count, torch.arange(d), bias)
    _, _, c_all, _ = _centred(every, bias)
    strength = DAMPING
    if stats.held_sum is not None and 0 < stats.held < stats.count:
        held = _moments(stats.held_sum, stats.held, torch.arange(d), bias)
        strength = _choose(weight, bias, every.minus(held), held, columns, sample, grid)
    return strength, damped_inverse(c_all, strength)


def _choose(weight, bias: bool, train, held, columns: np.ndarray, sample: int, grid) -> float:
    """The strength of ``grid`` with the smallest summed relative held-out error of single-unit refits."""
    mu_p, mu_o, c, _ = _centred(train, bias)
    v, _, _ = _about(held, mu_p, mu_o, bias)
    evals, q = torch.linalg.eigh(c)
    evals = evals.clamp_min(0)
    scale = float(evals.mean())
    if scale <= 0:
        return DAMPING
    units = columns[np.unique(np.linspace(0, len(columns) - 1, min(sample, len(columns))).round().astype(int))]
    cols = torch.as_tensor(units.reshape(-1), device=c.device)
    k = units.shape[1]
    w = weight.detach().double().to(c.device)[:, cols].T.reshape(len(units), k, -1)  # (units, k, out)
    base = torch.einsum("uko,ukl,ulo->u", w, v[cols][:, cols].reshape(len(units), k, len(units), k)
                        .diagonal(dim1=0, dim2=2).permute(2, 0, 1), w)  # held-out error of no refit
    best, best_error = DAMPING, math.inf
    q_cols = q[cols]  # (m, d)
    for s in grid:
        rows = (q_cols / (evals + s * scale)) @ q.T  # Hinv[cols, :]  (m, d)
        m = rows[:, cols].reshape(len(units), k, len(units), k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        z = (rows @ v @ rows.T).reshape(len(units), k, len(units), k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        a = torch.linalg.solve(m, w)  # M^-1 W_U^T  (units, k, out)
        error = torch.einsum("uko,ukl,ulo->u", a, z, a)
        total = float((error / base.clamp_min(1e-300)).sum())
        if total < best_error:
            best, best_error = s, total
    return best


@register_criterion("obs")
class OBS(ActivationCriterion):
    """Structured OBS from the calibration Gram matrices; ``damping``: None validates it per consumer on the
    held-out tokens (see the module), a number fixes it (as for :func:`fxprune.calibration.refit`)."""

    name = "obs"
    gram = True

    def __init__(self, batches, damping: float | None = None, normalizer="mean", progress=None):
        super().__init__(batches, normalizer, progress)
        self.damping, self._inverse = damping, None
        self.strengths: dict[str, float] = {}  # the damping used per consumer

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
        matrix = consumer.matrices(w.detach())[0]
        return obs_scores(matrix, None, self._inverse_of(consumer, matrix, bias, stats), unit_columns(consumer, index))

    def _inverse_of(self, consumer, matrix, bias, stats):
        """The damped inverse of ``consumer``'s input covariance, its damping validated on held-out tokens (or
        ``self.damping``), kept for the next unit of the same consumer."""
        name = consumer.weight
        # one inverse at a time: a consumer usually holds one group, and an LLM's d x d inverses do not all fit
        if self._inverse is None or self._inverse[0] != name:
            if self.damping is None:
                columns = unit_columns(consumer, np.arange(matrix.shape[1] // consumer.kernel)[:, None])
                strength, hinv = validated_damping(matrix, bias is not None, stats, columns)
            else:  # centred with a bias: the bias is refit freely
                d = stats.gram.shape[-1] - 1
                _, _, c, _ = _centred(_moments(stats.gram_sum, stats.count, torch.arange(d), bias is not None),
                                      bias is not None)
                strength, hinv = self.damping, damped_inverse(c, self.damping, name)
            self.strengths[name] = strength
            self._inverse = (name, hinv)
        return self._inverse[1]

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
                hinv = damped_inverse(s.gram[:-1, :-1], self.damping or DAMPING, f"{consumer.weight}[{e}]")
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
            hinv = damped_inverse(gram, self.damping or DAMPING, consumer.weight).diagonal()[:d]
            column = matrix.double().square().sum(0).to(hinv.device) / hinv
            total += column.reshape(-1, consumer.kernel).sum(1).cpu().numpy()
        return total


@register_criterion("obs-output")
class OutputOBS(OBS):
    """``"obs-output"``: structured OBS in units of the model's output, removing units greedily; scores comparable
    across layers (for ``global_pruning=True, isomorphic=True``).

    Two changes to ``"obs"``. (1) A consumer's output error ``e`` is weighed by how much it moves the model's
    output: ``e^T F e`` with ``F`` its output sensitivity (:mod:`fxprune.calibration.sensitivity`: the Fisher of
    the logits, or the squared error of a hidden-state output, from one backward pass on each of the first
    ``sensitivity_batches`` calibration batches, 32 by default: the estimate draws one random direction per token,
    and on all-MiniLM-L6-v2 the first 8 batches of 16 sentences left it noisy enough to move the plan), so
    ``dE(U) = trace(F W[:, U] Hinv[U, U]^-1 W[:, U]^T)`` is the output distortion (KL divergence, to second order,
    for an LM) of removing U and refitting: the same unit everywhere in the model. (2) Units are removed greedily,
    in chunks of 1/32 of a consumer's units: each chunk is the cheapest units given those already gone, then
    ``W`` and ``Hinv`` are updated as the refit would leave them (OBS's update, Hassibi & Stork; chunked as in
    ZipLM), so correlated units are not all scored cheap at once. A unit's score is its marginal ``dE`` when its
    chunk went (made non-decreasing along the order), so a global ranking stops taking units from a layer once
    the next ones cost more there than elsewhere. The damping is validated as for ``"obs"``. Grouped
    convolutions and expert weights keep ``"obs"``'s scores (weighted by the mean sensitivity of the others).
    The planner ranks these scores as they are (``plan_normalizer = None``), not divided by each group's mean.

    Example: every layer's heads one class and its MLP units another, each losing 30% where the model's output
    moves least::

        >>> pruned = fxprune.prune(model, 0.3, example_inputs=(x,), importance="obs-output", calibration=batches,
        ...                        reconstruct=True, global_pruning=True, isomorphic=True)
    """

    name = "obs-output"
    plan_normalizer = None
    CHUNKS = 32  # greedy steps per consumer (a chunk is at least one unit)

    def __init__(self, batches, damping: float | None = None, normalizer=None, progress=None,
                 sensitivity_batches: int = 32):
        super().__init__(batches, damping, normalizer, progress)
        self.sensitivity_batches, self.fisher = sensitivity_batches, None

    def prepare(self, dg) -> None:
        fresh = self._prepared_for is not dg
        super().prepare(dg)
        if fresh or self.fisher is None:
            from fxprune.calibration.sensitivity import output_sensitivity

            batches = list(itertools.islice(iter(self.batches), self.sensitivity_batches))
            self.fisher = output_sensitivity(dg, batches)
            traces = [float(f.trace()) / len(f) for f in self.fisher.values()]
            self._mean_scale = float(np.mean(traces)) if traces else 1.0

    def unit_scores(self, consumer, w, stats, index, tensors):
        name = consumer.weight
        if consumer.blocks != 1 or consumer.experts or name not in self.fisher:
            return self._mean_scale * super().unit_scores(consumer, w, stats, index, tensors)
        bias = tensors[consumer.bias] if consumer.bias else None
        matrix = consumer.matrices(w.detach())[0]
        return greedy_scores(matrix, self._inverse_of(consumer, matrix, bias, stats), unit_columns(consumer, index),
                             self.fisher[name], self.CHUNKS)


def greedy_scores(weight: torch.Tensor, hinv: torch.Tensor, columns: np.ndarray, fisher: torch.Tensor | None = None,
                  chunks: int = 32) -> np.ndarray:
    """Per unit (row of ``columns``, (units, k)), its marginal ``trace(F W_U Hinv_UU^-1 W_U^T)`` when removed by
    greedy OBS in ``chunks`` steps (see :class:`OutputOBS`), non-decreasing along the removal order; the last unit
    (never removed) scores above all others.

    Example: uncorrelated unit-variance inputs, no sensitivity: the squared column norms, in order::

        >>> greedy_scores(torch.tensor([[1.0, 3.0, 2.0]]), torch.eye(3, dtype=torch.float64), np.array([[0], [1], [2]]))
        array([ 1., 40.,  4.])
    """
    dev = hinv.device
    hinv = hinv.clone()
    w = weight.detach().double().to(dev).clone()
    f = fisher.double().to(dev) if fisher is not None else torch.eye(w.shape[0], dtype=torch.float64, device=dev)
    p = f @ w
    n = len(columns)
    cols = torch.as_tensor(columns, device=dev)
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    scores = np.zeros(n)
    step = max(1, n // chunks)
    running = 0.0
    while int(alive.sum()) > 1:
        idx = alive.nonzero().flatten()
        c = cols[idx]  # (m, k)
        block = hinv[c[:, :, None], c[:, None, :]]
        owned = w[:, c].permute(1, 2, 0)  # (m, k, out)
        weighed = p[:, c].permute(1, 2, 0)
        cost = (weighed * torch.linalg.solve(block, owned)).sum((1, 2)).clamp_min(0)
        take = torch.argsort(cost)[:min(step, len(idx) - 1)]
        for j in take.tolist():
            running = max(running, float(cost[j]))
            scores[int(idx[j])] = running
        gone = idx[take]
        alive[gone] = False
        u = cols[gone].reshape(-1)
        inner = torch.linalg.inv(hinv[u][:, u])
        rows = hinv[u, :]  # (|U|, d)
        update = inner @ rows
        w -= w[:, u] @ update
        p -= p[:, u] @ update
        hinv -= hinv[:, u] @ update
        w[:, u], p[:, u] = 0, 0
    scores[alive.cpu().numpy()] = 10 * running if running > 0 else 1.0  # never removed: above the others
    return scores
