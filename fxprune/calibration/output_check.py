"""The one-shot refit checked where it matters: at the model's output, on held-out calibration sequences.

Each consumer's ridge refit (:mod:`fxprune.calibration.reconstruct`) is validated on its own output, from the
original model's inputs. That can mislead: a refit that halves a layer's own error on held-out tokens may still
move the model's output further from the original than leaving the layer unrefit, because the pruned model
feeds it other inputs and what the later layers do with its error is not its squared size. (Measured on
all-MiniLM-L6-v2 at 30% of heads and MLP units, L2 units, calibrated on Python's language reference: the first
layer's attention-output refit alone lowers the mean cosine to the original on held-out text of the same source,
0.678 to 0.663, and on general English 0.678 to 0.455, although it lowers that layer's own error on both, by 78%
and 40%.)

So the refits are kept consumer by consumer, front to back (graph order), only where they help the whole
model: starting from the pruned model without refit, each consumer's refit is loaded and kept if the model's
output error on the held-out sequences does not grow, else undone. The locally validated strength is not taken
as final either: each consumer is also refit at that strength times each of
:data:`~fxprune.calibration.reconstruct.STRENGTH_FACTORS` (0.3, 3, and inf: the kept weights with the mean
corrected), and of these candidates the one with the smallest held-out output error is the one kept (if it beats
no refit). Per consumer that is one more forward pass per candidate; the candidates' weights are held until the
check (one copy of the refit weights per factor). The held-out sequences are the ones the
refits were validated on (:data:`~fxprune.calibration.statistics.HOLD_OUT`: every fifth sequence of each batch
of at least five, kept by the statistics pass, :func:`~fxprune.calibration.statistics.held_out_batches`;
at most 64 of them and :data:`MAX_VALUES` output values), never fitted on.
The error is the one the output's kind calls for (as :mod:`fxprune.calibration.sensitivity`): KL divergence of
the original's softmax to the pruned model's for ``logits``, else the squared error, per unpadded position
(2-d ``attention_mask``). Cost: one forward pass of the held-out sequences per candidate of each refit consumer,
plus one.

Each consumer's entry of ``result.meta["fxprune_refit"]["one-shot"]`` gains ``"output_check"``: ``"kept"`` or
``"undone"``, with the model's held-out output error before and after loading it (``"output_error_before"``,
``"output_error_after"``: the validated strength's), the error of each candidate by its strength factor
(``"output_errors"``, ``{"1.0": ..., "0.3": ..., "3.0": ..., "inf": ...}``) and the factor kept
(``"output_strength_factor"``, None when undone); ``result.meta["fxprune_refit"]["output check"]`` says what
ran, with the model's held-out output error before any refit (``"output_error_unrefit"``) and after the kept
ones (``"output_error"``: a calibration-side score of the whole pruning, which can choose between prunings
without looking at evaluation text), or why it did not run (no batch with five sequences to hold out).

Example (all-MiniLM-L6-v2, calibrated on 256 sentences of Python's language reference)::

    >>> pruned = fxprune.prune(model, 0.3, kwargs=example, importance="l2", calibration=batches,
    ...                        reconstruct=True)
    >>> pruned.meta["fxprune_refit"]["one-shot"]["encoder.layer.0.attention.output.dense.weight"]["output_check"]
    'undone'
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxprune.calibration.sensitivity import output_of
from fxprune.calibration.statistics import held_out_batches, placeholder_values, token_mask

MAX_VALUES = 2 ** 26  # output values kept as targets at most (64 Mi: 256 MiB of float32)


def model_output(model, batch) -> tuple[torch.Tensor | None, bool]:
    """``(output, is logits)`` of ``model`` on ``batch`` under ``no_grad``: a GraphModule run flat in an fx
    Interpreter (the analysed graph, the pruned one), another module called as its user calls it."""
    with torch.no_grad():
        if isinstance(model, fx.GraphModule):
            flat = fx.Interpreter(model).run(*placeholder_values(model, batch), enable_io_processing=False)
            out, logits = output_of(model, flat, need_grad=False)
        else:
            result = (model(**batch) if isinstance(batch, Mapping) else
                      model(batch) if isinstance(batch, torch.Tensor) else model(*batch))
            out, logits = output_of(None, result, need_grad=False, structured=True)
    return (out.detach() if out is not None else None), logits


def original_outputs(gm: fx.GraphModule, held: list) -> list:
    """The original model's ``(output, is logits)`` on each held-out batch, as long as they fit
    :data:`MAX_VALUES` (the batches past that are dropped from the check)."""
    out, values = [], 0
    for batch in held:
        target, logits = model_output(gm, batch)
        if target is None:
            return []
        values += target.numel()
        if values > MAX_VALUES and out:
            break
        out.append((target.float(), logits))
    return out


def output_error(model, held: list, targets: list) -> float:
    """The mean per-position output error of ``model`` against ``targets`` (see the module)."""
    total, count = 0.0, 0
    for batch, (target, logits) in zip(held, targets):
        out, _ = model_output(model, batch)
        out = out.float().to(target.device)
        if logits:
            t = torch.log_softmax(target, -1)
            per = (t.exp() * (t - torch.log_softmax(out, -1))).sum(-1)
        else:
            per = (out - target).square().reshape(*out.shape[:2], -1).sum(-1) if out.dim() >= 2 else \
                (out - target).square()
        mask = token_mask(batch)
        if mask is not None and tuple(mask.shape) == tuple(per.shape[:2]):
            keep = mask.to(per.device) != 0
            per = per[keep] if per.dim() == 2 else per.reshape(*per.shape[:2], -1)[keep]
        total += float(per.double().sum())
        count += per.numel()
    return total / max(count, 1)


def check_refits(result, refit: dict, consumers: list, held: list, targets: list, report: dict,
                 alternatives: dict | None = None, summary: dict | None = None) -> dict:
    """Load into ``result`` (the pruned model, not yet refit) the refits of ``refit`` (``{parameter name:
    tensor}``) consumer by consumer, keeping each only where the held-out output error does not grow (see the
    module); ``consumers``: ``[(weight name, [its parameter names in refit])]`` in graph order. ``report``: the
    one-shot choices by weight name, each given ``"output_check"`` and the errors. ``alternatives``: ``{weight
    name: [(strength factor, {parameter name: tensor})]}``, other refits of a consumer to try after the
    validated one (:func:`~fxprune.calibration.reconstruct.refit_consumers`); the one with the smallest held-out
    output error is kept (on ties the validated one, then the first given). ``summary``, a dict, receives the
    held-out output error without any refit (``"output_error_unrefit"``) and with the kept ones
    (``"output_error"``). Returns the kept refits."""
    params = dict(result.named_parameters(remove_duplicate=False))
    alternatives = alternatives or {}
    kept: dict = {}
    current = output_error(result, held, targets)
    unrefit = current
    for weight, names in consumers:
        names = [n for n in names if n in refit and n in params]
        if not names:
            continue
        saved = {n: params[n].detach().clone() for n in names}
        candidates = [(1.0, {n: refit[n] for n in names})]
        candidates += [(f, {n: t[n] for n in names}) for f, t in alternatives.get(weight, [])
                       if all(n in t for n in names)]
        errors = []
        for _, tensors in candidates:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(tensors[n])
            errors.append(output_error(result, held, targets))
        best = min(range(len(candidates)), key=lambda i: (errors[i], i))
        factor, tensors = candidates[best]
        keep = errors[best] <= current
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[n] if keep else saved[n])
        if keep:
            kept.update(tensors)
        entry = report.get(weight)
        if isinstance(entry, dict):
            entry.update({"output_check": "kept" if keep else "undone", "output_error_before": current,
                          "output_error_after": errors[0]})
            if len(candidates) > 1:
                entry.update({"output_strength_factor": _clean(factor) if keep else None,
                              "output_errors": {str(f): e for (f, _), e in zip(candidates, errors)}})
        current = errors[best] if keep else current
    if summary is not None:
        summary.update({"output_error_unrefit": unrefit, "output_error": current})
    return kept


def _clean(factor: float):
    """A strength factor as JSON: ``inf`` as the string ``"inf"``."""
    return factor if math.isfinite(factor) else "inf"
