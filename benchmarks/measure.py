"""What a benchmark compares between an original and a pruned model: output shapes, outputs, MACs.

Outputs of any structure (tensor, tuple, dict, Hugging Face ``ModelOutput``)
are flattened to their tensors in order; cache objects and other non-tensors
are skipped. MACs come from ``fxprune.macs.count`` when it can capture the
model, else from Torch-Pruning's ``count_ops_and_params``; a ratio always uses
one counter for both models.

Example::

    >>> shapes(model(x))
    [[1, 1000]]
    >>> macs_ratio(model, pruned, (x,), {})
    (0.257, 'fxprune')
"""

from __future__ import annotations

import torch


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nested output, in order (dict values in insertion order)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def shapes(value) -> list[list[int]]:
    return [list(t.shape) for t in tensors(value)]


def run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def relative_diff(got, expected) -> float:
    """Largest ``|got - expected|`` over all output tensors, relative to the largest ``|expected|``."""
    pairs = list(zip(tensors(got), tensors(expected)))
    scale = max(float(e.abs().max()) for _, e in pairs)
    return max(float((g - e).abs().max()) for g, e in pairs) / max(scale, 1e-30)


class Positional(torch.nn.Module):
    """``Positional(t5, ["decoder_input_ids"])(ids, dec)`` calls ``t5(ids, decoder_input_ids=dec)``."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        split = len(args) - len(self.names)
        return self.model(*args[:split], **dict(zip(self.names, args[split:])))


def count(model, args, kwargs, counter: str) -> float:
    """MACs of one forward pass with ``"fxprune"`` or ``"torch-pruning"``'s counter."""
    if counter == "fxprune":
        import fxprune.analysis.macs

        if kwargs:  # fxprune.macs.count takes positional inputs: keyword inputs become trailing positional ones
            model, args = Positional(model, list(kwargs)), tuple(args) + tuple(kwargs.values())
        return float(fxprune.analysis.macs.count(model, args)[0])
    import torch_pruning as tp

    from tp_recipe import tp_inputs

    with torch.no_grad():
        return float(tp.utils.count_ops_and_params(model, tp_inputs(model, args, kwargs))[0])


def macs_ratio(original, pruned, args, kwargs) -> tuple[float | None, str]:
    """(pruned MACs / original MACs, counter used); (None, why) if no counter handles both models."""
    problems = []
    for counter in ("fxprune", "torch-pruning"):
        try:
            before, after = count(original, args, kwargs, counter), count(pruned, args, kwargs, counter)
            if before <= 0 or after <= 0:  # Torch-Pruning's module hooks see no layers in an exported graph
                raise ValueError(f"counted {before:.0f} and {after:.0f} MACs")
            return after / before, counter
        except Exception as exc:  # try the other counter, and say why neither worked if both fail
            problems.append(f"{counter}: {type(exc).__name__}")
    return None, "; ".join(problems)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())
