"""Depth magnitude: a data-free score of a residual branch (or layer) from its output projection's weights.

A branch adds ``P(h)`` to its stream, where ``P`` is the last weight on each path to the add (the output
projection ``o_proj``, an MLP's ``down_proj``, a ResNet block's last conv), possibly followed by scales (a
layer scale, the BatchNorm after that conv). The score is the Frobenius norm of those weights (of two or
more dimensions) times the root mean square of every scale vector after them (biases and shifts are left
out): a branch whose projection is zero scores 0 and is removed first (the depth oracle), and a layer scale
that shrank a block during training shows. A layer scores the sum of its branches. Without data this ranks
branches of one kind fairly (the attention branches of a model against each other); across kinds, where
projections differ in shape, calibration (block influence, output error) is the better guide.

Example::

    >>> scores = depth_magnitude(dg, [b for b in dg.branches if b.removable])
"""

from __future__ import annotations

import math

from fxprune.analysis.branches import last_projection


def branch_magnitude(dg, branch) -> float:
    tensors = dict(dg.gm.named_parameters(remove_duplicate=False))
    norm, scale = 0.0, 1.0
    for name in last_projection(dg.gm, branch):
        t = tensors[name].detach().double()
        if t.ndim >= 2:
            norm += float(t.pow(2).sum())
        elif not name.endswith("bias"):
            scale *= float(t.pow(2).mean().sqrt())
    return math.sqrt(norm) * scale


def depth_magnitude(dg, candidates) -> dict:
    """``{branch or layer: magnitude}`` (see module docstring)."""
    out = {}
    for c in candidates:
        branches = c.branches if hasattr(c, "branches") else [c]
        out[c] = sum(branch_magnitude(dg, b) for b in branches if b.stream)
    return out
