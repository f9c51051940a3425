"""How much the model's output moves when a consumer's output moves: one ``out x out`` matrix per consumer.

For a consumer with output ``y`` (per token), a small error ``e`` added to ``y`` moves the model's output
``f`` by ``J e`` (``J = df / dy``); its expected size is ``e^T F e`` with ``F = E[J^T M J]`` over the calibration
tokens, where ``M`` is the metric of the output: the Fisher matrix of the softmax for logits (so ``e^T F e``
is the KL divergence the error causes, to second order), the identity for other outputs (hidden states: the
squared error). ``F`` is estimated without Jacobians, from backward passes: with ``r`` drawn per token so
that ``E[r r^T] = M`` (a label sampled from the model's own softmax, ``r = onehot - p``; else ``r ~ N(0, I)``),
the gradient ``g`` of ``r . f`` with respect to ``y`` has ``E[g g^T] = F``. One backward pass through the
analysed graph per batch gives ``g`` at every consumer at once (a zero leaf is added to each consumer's output,
so its gradient is the total derivative through everything downstream). Padding positions of the output (a 2-d
``attention_mask``) draw ``r = 0`` and the consumer rows at padding are left out.

The output is the graph's ``logits`` output when it has one, else its first floating-point output.

Example::

    >>> fisher = output_sensitivity(dg, batches[:8])
    >>> fisher["encoder.layer.5.output.dense.weight"].shape
    torch.Size([384, 384])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxprune.calibration.consumers import calibrated_consumers
from fxprune.calibration.statistics import placeholder_values, token_mask


class _Leaves(fx.Interpreter):
    """Runs the graph, adding to every watched call's output a zero leaf that requires grad (kept by weight name):
    the gradient at the leaf is the one at the output, through everything downstream (later watched outputs
    included: a detached output would cut the paths of the consumers before it)."""

    def __init__(self, gm, watched: dict):
        super().__init__(gm)
        self.watched, self.leaves = watched, []

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.watched and isinstance(value, torch.Tensor) and value.is_floating_point():
            leaf = torch.zeros_like(value, requires_grad=True)
            self.leaves.append((self.watched[n], leaf))
            value = value + leaf
        return value


def output_of(gm: fx.GraphModule | None, flat, need_grad: bool = True,
              structured: bool = False) -> tuple[torch.Tensor | None, bool]:
    """``(output tensor, is logits)``: the ``logits`` output, else the first floating-point one (one that requires
    grad, with ``need_grad``). ``flat``: the graph's flat outputs, or with ``structured`` a model's own output."""
    if structured:
        out = flat
    else:
        try:
            out = gm.graph.process_outputs(flat)
        except Exception:  # noqa: BLE001 - a graph without an output spec: its flat outputs
            out = flat

    def usable(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and (t.requires_grad or not need_grad)

    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if usable(logits):
        return logits, True
    for leaf in tree_leaves(dict(out) if isinstance(out, Mapping) else out):
        if usable(leaf):
            return leaf, False
    return None, False


def _direction(out: torch.Tensor, logits: bool, mask, generator) -> torch.Tensor:
    """``r`` with ``E[r r^T]`` the output's metric (see the module), zero at padding positions."""
    if logits:
        p = torch.softmax(out.detach().float(), -1)
        label = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])
        r = torch.nn.functional.one_hot(label, p.shape[-1]).to(p.dtype) - p
    else:
        r = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
    if mask is not None and tuple(mask.shape) == tuple(out.shape[:2]):
        r = r * mask.to(r.device, r.dtype).reshape(*mask.shape, *([1] * (out.dim() - 2)))
    return r.to(out.dtype)


def output_sensitivity(dg, batches, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{consumer weight name: F}`` (float64, ``out x out`` over the consumer's output features, a convolution's
    channels) over ``batches`` (see the module). Consumers whose output is not one tensor with the features
    last (a convolution: features on axis 1) are left out, as are expert weights."""
    gm = dg.gm
    consumers = {name: c for name, c in calibrated_consumers(dg).items() if not c.experts}
    watched = {node: name for name, c in consumers.items() for node, _ in c.calls}
    generator = torch.Generator().manual_seed(seed)
    fisher: dict[str, torch.Tensor] = {}
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    try:
        for batch in batches:
            mask = token_mask(batch)
            runner = _Leaves(gm, watched)
            with torch.enable_grad():
                flat = runner.run(*placeholder_values(gm, batch), enable_io_processing=False)
                out, logits = output_of(gm, flat)
                if out is None:
                    raise ValueError("output sensitivity: the graph has no floating-point output that depends on "
                                     "the calibrated layers")
                leaves = [leaf for _, leaf in runner.leaves]
                # only the leaves' gradients: the parameters' are neither needed nor accumulated
                grads = torch.autograd.grad((out * _direction(out, logits, mask, generator)).sum(), leaves,
                                            allow_unused=True)
            for (name, leaf), grad in zip(runner.leaves, grads):
                if grad is None:
                    continue
                grad = grad.movedim(1, -1) if consumers[name].patches is not None else grad
                rows = grad.reshape(-1, grad.shape[-1]).double()
                if mask is not None and consumers[name].patches is None and \
                        tuple(leaf.shape[:-1]) == tuple(mask.shape):
                    rows = rows[mask.reshape(-1).to(rows.device) != 0]
                fisher[name] = fisher.get(name, 0) + rows.T @ rows
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    count = max(len(batches), 1)
    return {name: f / count for name, f in fisher.items()}
