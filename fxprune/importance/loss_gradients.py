"""Calibration: gradients of a user loss over a few batches, without side effects on the model.

The loss runs on the captured GraphModule (``dg.gm``), which computes the same
function as the user's model and, for an ``nn.Module``, shares its parameters.
Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is left on
the user's parameters; buffers (BatchNorm running statistics) are restored
afterwards, so a model in training mode is not changed either. Parameters
with ``requires_grad=False`` get gradients too and keep their flag.

Example::

    >>> loss_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    >>> stats = calibrate(dg.gm, [(x, y)], loss_fn)
    >>> stats.mean_grad["fc.weight"].shape, stats.mean_sq_grad["fc.weight"].shape
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def classification_loss(model, batch):
    """The default loss: ``batch = (inputs, targets)``, cross-entropy of ``model(inputs)``."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


@dataclass
class GradientStats:
    mean_grad: dict  # parameter name (every alias) -> mean gradient over the batches
    mean_sq_grad: dict  # parameter name -> mean of the squared per-batch gradients (empirical Fisher)
    batches: int


def calibrate(gm: torch.nn.Module, batches, loss_fn=None, progress=None) -> GradientStats:
    """Mean gradient and mean squared gradient of ``loss_fn(gm, batch)`` over ``batches``.

    ``progress``: ``True``/``False`` to force the tqdm bar on or off; ``None``
    shows it only on a terminal.
    """
    loss_fn = loss_fn or classification_loss
    params = dict(gm.named_parameters())
    if any(p.device.type == "meta" for p in params.values()):
        raise ValueError("gradient-based importance needs real weights; the model is on the meta device")
    saved_buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    grad_sum = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    sq_sum = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in tqdm(batches, desc="fxprune calibration", disable=None if progress is None else not progress):
            with torch.enable_grad():
                loss = loss_fn(gm, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for name, g in zip(params, grads):
                    if g is not None:
                        grad_sum[name] += g.float()
                        sq_sum[name] += g.float().square()
            count += 1
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved_buffers[name])
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
    if count == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    return GradientStats(_with_aliases(gm, {n: g / count for n, g in grad_sum.items()}),
                         _with_aliases(gm, {n: s / count for n, s in sq_sum.items()}), count)


def _with_aliases(gm: torch.nn.Module, by_name: dict) -> dict:
    """The same tensors under every name a tied parameter has (members use any of them)."""
    first = {id(p): name for name, p in gm.named_parameters()}
    return {name: by_name[first[id(p)]] for name, p in gm.named_parameters(remove_duplicate=False)}
