"""BatchNorm re-estimation: new running statistics for a pruned model, from calibration batches.

Pruning (and reconstruction) changes what reaches each BatchNorm, while its running mean and variance still
describe the original model. ``reestimate_batchnorm`` resets the running statistics of every BatchNorm
module (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and subclasses of ``_BatchNorm``) and runs the batches
with only those modules in training mode and ``momentum=None``: PyTorch's cumulative average, so after
``n`` batches ``running_mean`` is the mean of the per-batch means and ``running_var`` the mean of the
per-batch unbiased variances. Everything else stays in its mode (dropout off in an eval model); modes and
momenta are put back afterwards; no gradients are recorded.

Only modules are re-estimated: a ``torch.export`` graph computes batch norm with functional aten ops over
buffers (``_native_batch_norm_legit_no_training``), which has no training mode to switch to; such a graph
raises ``NotImplementedError`` naming the node (capture the model with ``torch.fx.symbolic_trace``, which
keeps BatchNorm modules, or re-estimate before exporting). A BatchNorm without running statistics
(``track_running_stats=False``) always normalises by the batch and has nothing to re-estimate.

Example::

    >>> pruned = fxprune.prune(model, 0.5, example_inputs=(x[:1],))
    >>> pruned = reestimate_batchnorm(pruned, [x[i:i + 64] for i in range(0, 512, 64)])
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from fxprune.analysis.capture import split_inputs
from fxprune.errors import source_line

_FUNCTIONAL = ("batch_norm", "_native_batch_norm_legit", "native_batch_norm", "cudnn_batch_norm")


def _functional_batch_norms(model) -> list[fx.Node]:
    """The functional batch norm calls of a graph (an exported model's), which cannot be switched to training."""
    if not isinstance(model, fx.GraphModule):
        return []
    out = []
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if node.target is torch.nn.functional.batch_norm or name.split(".")[0] in _FUNCTIONAL \
                or name.startswith("_native_batch_norm_legit"):
            out.append(node)
    return out


def reestimate_batchnorm(model: torch.nn.Module, batches, *, inplace: bool = False, progress=None):
    """Reset and re-estimate the running statistics of every BatchNorm module of ``model`` on ``batches``.

    A batch is a tensor (the one positional input), a tuple or list of positional inputs, or a dict of keyword
    inputs. Returns the model with new statistics: a deep copy unless ``inplace=True`` (the caller's model is
    left untouched then). ``progress``: ``True``/``False`` forces the tqdm bar on or off; ``None`` shows it on
    a terminal.
    """
    if batches is None:
        raise ValueError("BatchNorm re-estimation needs calibration batches: pass calibration=[batch, ...]")
    functional = _functional_batch_norms(model)
    if functional:
        node = functional[0]
        raise NotImplementedError(
            f"BatchNorm re-estimation works on BatchNorm modules; {len(functional)} batch norm call(s) of this "
            f"graph are functional ops over buffers (node {node.name}: {node.target}, "
            f"{source_line(node) or 'no source line'}), as torch.export makes them: capture the model with "
            "torch.fx.symbolic_trace, or re-estimate before exporting")
    if not inplace:
        model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        warnings.warn("fxprune: BatchNorm re-estimation found no BatchNorm module with running statistics: "
                      "nothing was re-estimated", stacklevel=2)
        return model
    saved = [(m.training, m.momentum) for m in norms]
    count = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in tqdm(batches, desc="fxprune BatchNorm re-estimation",
                              disable=None if progress is None else not progress):
                args, kwargs = split_inputs(batch if isinstance(batch, (dict, torch.Tensor)) else tuple(batch))
                model(*args, **(kwargs or {}))
                count += 1
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
    if count == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    return model
