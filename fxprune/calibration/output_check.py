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
output error on the held-out sequences does not grow, else undone. The held-out sequences are the ones the
refits were validated on (:data:`~fxprune.calibration.statistics.HOLD_OUT`: every fifth sequence of each batch
of at least five, kept by the statistics pass, :func:`~fxprune.calibration.statistics.held_out_batches`;
at most 64 of them and :data:`MAX_VALUES` output values), never fitted on.
The error is the one the output's kind calls for (as :mod:`fxprune.calibration.sensitivity`): KL divergence of
the original's softmax to the pruned model's for ``logits``, else the squared error, per unpadded position
(2-d ``attention_mask``). Cost: one forward pass of the held-out sequences per refit consumer, plus one.

Each consumer's entry of ``result.meta["fxprune_refit"]["one-shot"]`` gains ``"output_check"``: ``"kept"`` or
``"undone"``, with the model's held-out output error before and after loading it (``"output_error_before"``,
``"output_error_after"``); ``result.meta["fxprune_refit"]["output check"]`` says what ran, with the model's
held-out output error before any refit (``"output_error_unrefit"``) and after the kept ones (``"output_error"``:
a calibration-side score of the whole pruning, which can choose between prunings without looking at evaluation
text), or why it did not run (no batch with five sequences to hold out).

Example (all-MiniLM-L6-v2, calibrated on 256 sentences of Python's language reference)::

    >>> pruned = fxprune.prune(model, 0.3, kwargs=example, importance="l2", calibration=batches,
    ...                        reconstruct=True)
    >>> pruned.meta["fxprune_refit"]["one-shot"]["encoder.layer.0.attention.output.dense.weight"]["output_check"]
    'undone'
"""

from __future__ import annotations

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
                 summary: dict | None = None) -> dict:
    """Load into ``result`` (the pruned model, not yet refit) the refits of ``refit`` (``{parameter name:
    tensor}``) consumer by consumer, keeping each only where the held-out output error does not grow (see the
    module); ``consumers``: ``[(weight name, [its parameter names in refit])]`` in graph order. ``report``: the
    one-shot choices by weight name, each given ``"output_check"`` and the errors. ``summary``, a dict, receives
    the held-out output error without any refit (``"output_error_unrefit"``) and with the kept ones
    (``"output_error"``). Returns the kept refits."""
    params = dict(result.named_parameters(remove_duplicate=False))
    kept: dict = {}
    current = output_error(result, held, targets)
    unrefit = current
    for weight, names in consumers:
        names = [n for n in names if n in refit and n in params]
        if not names:
            continue
        saved = {n: params[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                params[n].copy_(refit[n])
        error = output_error(result, held, targets)
        entry = report.get(weight)
        keep = error <= current
        if keep:
            kept.update({n: refit[n] for n in names})
        else:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(saved[n])
        if isinstance(entry, dict):
            entry.update({"output_check": "kept" if keep else "undone", "output_error_before": current,
                          "output_error_after": error})
        current = error if keep else current
    if summary is not None:
        summary.update({"output_error_unrefit": unrefit, "output_error": current})
    return kept
