"""Ridge refits whose strength is chosen on held-out calibration tokens, so that a refit cannot overfit its text.

A refit predicts a consumer's original output ``t = W o + b`` (``o``: the inputs the original model gives it)
from the inputs ``p`` it has after pruning (the kept columns of ``o`` for the one-shot refit of
:mod:`fxprune.calibration.reconstruct`; the pruned model's own inputs for the sequential refit of
:mod:`fxprune.calibration.sequential`), starting from current weights ``[W1, b1]`` (the kept columns of the
original weights; for the sequential refit, the one-shot refit). With a bias, the bias is free and the
kept weights are shrunk towards ``W1``::

    W' = W1 + (W C_op - W1 C_pp) (C_pp + lam I)^-1,      b' = b + W mu_o - W' mu_p

where ``mu`` are means and ``C`` centred (co)variances over the calibration tokens. ``lam -> 0`` is the least-
squares refit; ``lam -> inf`` keeps ``W1`` and only moves the bias so that the mean output is right (FLAP's
bias compensation, for the one-shot refit); a consumer without a bias uses uncentred moments and no bias.
``lam = strength * mean(diag C_pp)``.

The strength is chosen per consumer (and per block of a grouped convolution, per expert) on held-out tokens
(:data:`fxprune.calibration.statistics.HOLD_OUT`: every fifth sequence of a batch, see there): fitted on the
other tokens, each strength of :data:`GRID` (and ``inf``, and the unchanged weights ``[W1, b1]``) is scored by
its output error on the held-out ones, in closed form from one eigendecomposition ``C_pp = Q diag(e) Q^T`` of
the training tokens: with ``f = 1 / (e + lam)``, ``A = (W C_op - W1 C_pp) Q`` and held-out moments ``V`` taken
about the training means, the held-out error is ``f^T ((Q^T V_pp Q) * (A^T A)) f + 2 c^T f + e_inf`` with
``c_i = (Q^T (V_pp W1^T - V_po W^T) A)_ii``, a quadratic form per strength. The refit then uses every token
at the chosen strength. With few tokens for its width, a consumer's validated strength grows, which shrinks
its refit towards ``[W1, b1]``: the data decide how far to trust the correlations they show.

Example: 40 tokens for 30 kept inputs of pure noise; the least-squares refit would fit the noise, the
validated one keeps the original weights and corrects the mean::

    >>> new_w, new_b, choice = ridge_refit(w, b, w[:, kept], b, Moments.of(train), Moments.of(held),
    ...                                    Moments.of(every))
    >>> choice.strength, choice.error_after <= choice.error_before
    (inf, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GRID = tuple(float(s) for s in 10.0 ** np.linspace(-6, 2, 25))  # candidate strengths, relative to mean diag C_pp
UNCHANGED = float("nan")  # the strength recorded when the current weights [W1, b1] are kept as they are


@dataclass
class Moments:
    """Normalised moments ``E[.]`` over a set of tokens: ``pp = E[p~ p~^T]``, ``op = E[o~ p~^T]`` and (optional)
    ``oo = E[o~ o~^T]``, with ``x~ = [x, 1]`` when the consumer has a bias (the constant last), else ``x``."""

    count: int
    pp: torch.Tensor
    op: torch.Tensor
    oo: torch.Tensor | None = None

    @classmethod
    def of_sums(cls, count: int, pp, op, oo=None) -> Moments:
        """From float64 sums over ``count`` tokens."""
        n = max(count, 1)
        return cls(count, pp / n, op / n, None if oo is None else oo / n)

    def minus(self, other: Moments) -> Moments:
        """The moments of the tokens of ``self`` that are not in ``other`` (a subset of them)."""
        n = self.count - other.count
        if n <= 0:
            return Moments(0, self.pp * 0, self.op * 0, None)
        mix = lambda a, b: (a * self.count - b * other.count) / n  # noqa: E731
        oo = None if self.oo is None or other.oo is None else mix(self.oo, other.oo)
        return Moments(n, mix(self.pp, other.pp), mix(self.op, other.op), oo)


@dataclass
class Choice:
    """What the validation chose for one refit: ``strength`` (relative to ``mean(diag C_pp)``; ``inf``: the current
    weights with the mean corrected; nan: the current weights unchanged), the held-out output errors of the
    current weights (``error_before``) and of the chosen refit fitted without the held-out tokens
    (``error_after``), both relative to the held-out variance of the original output; ``tokens`` calibration
    tokens, ``held_out`` of them held out; ``width`` inputs after pruning. Errors are None when nothing was held
    out (then ``strength`` is the fixed one given)."""

    strength: float
    error_before: float | None
    error_after: float | None
    tokens: int
    held_out: int
    width: int

    def as_dict(self) -> dict:
        def clean(v):  # inf (no refit) as a string, so the meta stays JSON
            return None if v is None else (str(v) if isinstance(v, float) and not math.isfinite(v) else v)

        return {"strength": clean(self.strength), "held_out_error_before": clean(self.error_before),
                "held_out_error_after": clean(self.error_after), "tokens": self.tokens,
                "held_out_tokens": self.held_out, "width": self.width}


def _centred(m: Moments, bias: bool):
    """``(mu_p, mu_o, C_pp, C_op)``: means and centred moments (no constant column); zeros means without a bias."""
    if not bias:
        dp, do = m.pp.shape[0], m.op.shape[0]
        return m.pp.new_zeros(dp), m.op.new_zeros(do), m.pp, m.op
    mu_p, mu_o = m.pp[:-1, -1], m.op[:-1, -1]
    return (mu_p, mu_o, m.pp[:-1, :-1] - torch.outer(mu_p, mu_p), m.op[:-1, :-1] - torch.outer(mu_o, mu_p))


def _about(m: Moments, mu_p, mu_o, bias: bool):
    """Held-out ``(V_pp, V_po, V_oo)``: second moments about the training means ``mu`` (``V_oo`` None if unknown)."""
    if not bias:
        return m.pp, m.op.T, m.oo
    hp, ho = m.pp[:-1, -1], m.op[:-1, -1]  # held-out means
    v_pp = m.pp[:-1, :-1] - torch.outer(hp, mu_p) - torch.outer(mu_p, hp) + torch.outer(mu_p, mu_p)
    v_op = m.op[:-1, :-1] - torch.outer(ho, mu_p) - torch.outer(mu_o, hp) + torch.outer(mu_o, mu_p)
    v_oo = None
    if m.oo is not None:
        v_oo = m.oo[:-1, :-1] - torch.outer(ho, mu_o) - torch.outer(mu_o, ho) + torch.outer(mu_o, mu_o)
    return v_pp, v_op.T, v_oo


def _trace(a, m, b) -> float:
    """``trace(a m b^T)``."""
    return float(((a @ m) * b).sum())


def _solve(w, b, w1, m: Moments, bias: bool, strength: float):
    """The refit ``(W', b')`` at ``strength`` from the moments ``m`` (see the module)."""
    mu_p, mu_o, c_pp, c_op = _centred(m, bias)
    if strength == math.inf:
        new_w = w1
    else:
        lam = strength * c_pp.diagonal().mean().clamp_min(0)
        inner = c_pp + lam * torch.eye(len(c_pp), dtype=c_pp.dtype, device=c_pp.device)
        residual = w @ c_op - w1 @ c_pp  # (out, p): what W1 still misses, as a gradient
        if not bool(torch.any(residual != 0)):
            new_w = w1
        else:
            try:
                step = torch.linalg.solve(inner, residual.T).T  # inner is symmetric
            except RuntimeError:  # singular (no damping, constant inputs): the least-norm solution
                step = residual @ torch.linalg.pinv(inner, hermitian=True)
            new_w = w1 + step
    new_b = (b + w @ mu_o - new_w @ mu_p) if bias else None
    return new_w, new_b


def ridge_refit(w: torch.Tensor, b: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor | None,
                train: Moments, held: Moments | None, every: Moments, strength: float | None = None,
                default: float = 1e-4, grid=GRID) -> tuple[torch.Tensor, torch.Tensor | None, Choice]:
    """The refit ``(W', b', Choice)`` of a consumer (float64, on the moments' device).

    ``w, b``: the original weights (out, inputs ``o``) and bias (None without); ``w1, b1``: the current ones
    (out, inputs ``p``); ``train``, ``held``: moments of the training and held-out tokens (``held.oo`` needed);
    ``every``: of all of them (the final fit). ``strength``: a fixed strength instead of the validation;
    ``default``: the strength used when no token was held out (or none is left to train on).
    """
    bias = b is not None
    dev = every.pp.device
    w, w1 = w.double().to(dev), w1.double().to(dev)
    b = b.double().to(dev) if bias else None
    b1 = b1.double().to(dev) if (bias and b1 is not None) else (b if bias else None)
    width = w1.shape[1]
    if strength is not None or held is None or held.count == 0 or train.count == 0:
        chosen = strength if strength is not None else default
        new_w, new_b = _solve(w, b, w1, every, bias, chosen)
        return new_w, new_b, Choice(chosen, None, None, every.count, 0 if held is None else held.count, width)
    candidates, before, energy = _validation_errors(w, b, w1, b1, train, held, bias, grid)
    # the smallest held-out error; on ties the strongest shrinkage (candidates are ordered weakest first)
    best, error = min(reversed(candidates), key=lambda c: c[1])
    new_w, new_b = (w1, b1) if math.isnan(best) else _solve(w, b, w1, every, bias, best)
    scale = max(energy, 1e-300)
    return new_w, new_b, Choice(best, before / scale, error / scale, every.count, held.count, width)


def _validation_errors(w, b, w1, b1, train: Moments, held: Moments, bias: bool, grid):
    """``([(strength, held-out error)] weakest shrinkage first, error of the unchanged weights, held-out output
    variance)``: fitted on ``train``, scored on ``held`` (squared errors summed over outputs, mean over tokens)."""
    mu_p, mu_o, c_pp, c_op = _centred(train, bias)
    v_pp, v_po, v_oo = _about(held, mu_p, mu_o, bias)
    if v_oo is None or held.oo is None:
        raise ValueError("ridge validation needs the held-out tokens' original-input moments (held.oo)")
    evals, q = torch.linalg.eigh(c_pp)
    evals = evals.clamp_min(0)
    a = (w @ c_op - w1 @ c_pp) @ q  # (out, p)
    m = v_pp @ w1.T - v_po @ w.T  # (p, out): E_held[p r^T], r = W1 p - W o (about the training means)
    c = ((q.T @ m) * a.T).sum(1)
    k = (q.T @ v_pp @ q) * (a.T @ a)
    e_inf = _trace(w1, v_pp, w1) - 2 * _trace(w1, v_po, w) + _trace(w, v_oo, w)  # current weights, mean fixed
    scale = float(evals.mean())
    candidates = []
    for s in grid:
        if scale > 0:
            f = 1.0 / (evals + s * scale)
            candidates.append((s, max(float(f @ k @ f + 2 * (c @ f)) + e_inf, 0.0)))
    candidates.append((math.inf, max(e_inf, 0.0)))
    # the current weights and bias as they are (no mean correction): from the raw held-out moments
    t = torch.cat([w, b[:, None]], 1) if bias else w
    a1 = torch.cat([w1, b1[:, None]], 1) if bias else w1
    before = max(_trace(a1, held.pp, a1) - 2 * _trace(t, held.op, a1) + _trace(t, held.oo, t), 0.0)
    candidates.append((UNCHANGED, before))
    return candidates, before, _trace(w, v_oo, w)
