"""Lookups and metadata: embedding, ``size()``/``shape``/``dim()``, attribute access on tensors.

Example: ``F.embedding(ids (B, S), w (V, D))`` ties ``out[2]`` to ``w[1]``; the
vocabulary axis ``w[0]`` is indexed by data, so it is frozen.
"""

from __future__ import annotations

import builtins

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.registry import family, register
from fxprune.rules.shape import matrix_transpose


def _embedding_signature(input, weight, padding_idx=None, *args, **kwargs):  # noqa: A002
    pass


@register(nn.Embedding, F.embedding)
def embedding(r) -> None:
    a = r.bind(_embedding_signature)
    ids, w, out = a["input"], a["weight"], r.out
    for d in range(ids.ndim):
        r.same(ids[d], out[d])
    r.same(w[1], out[-1])
    r.freeze(w[0], "vocabulary (indexed by data)")
    r.module_attr("embedding_dim", w[1])


def metadata(r) -> None:
    """Reading a tensor's size, dtype or device states no relation (its value follows the tensor)."""


family(metadata, "size", "dim", "numel", "get_device", "element_size", "is_contiguous",
       builtins.len, torch.numel, torch.is_tensor, builtins.isinstance)


@register(builtins.getattr)
def tensor_attribute(r) -> None:
    name = r.node.args[1]
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return
    if name in ("T", "mT") and r.input(0) is not None and r.input(0).ndim == 2:
        matrix_transpose(r)
        return
    r.freeze_all(f"tensor attribute .{name}")
