"""Linear maps and contractions: linear, matmul/mm/bmm/@, addmm/baddbmm, einsum.

Example: ``F.linear(x (B, 16), w (8, 16), b (8))`` ties ``x[1]`` to ``w[1]``
(the contraction) and ``w[0]`` to ``b[0]`` and ``out[1]``.

A product of two activations (both computed from graph inputs, tracked in ``state.from_input`` by relate) is
attention written out: its contraction and free non-batch axes are marked ``r.head_dim``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.elementwise import tie_broadcast
from fxprune.rules.registry import register


def _linear_signature(input, weight, bias=None):  # noqa: A002
    pass


@register(nn.Linear, F.linear)
def linear(r) -> None:
    a = r.bind(_linear_signature)
    x, w, b, out = a["input"], a["weight"], a["bias"], r.out
    for d in range(x.ndim - 1):
        r.same(x[d], out[d])
    r.same(x[-1], w[-1])
    if w.ndim == 2:
        r.same(out[-1], w[0])
    if b is not None and b.ndim == 1 and w.ndim == 2:
        r.same(b[0], w[0])
    r.module_attr("in_features", x[-1])
    if w.ndim == 2:
        r.module_attr("out_features", w[0])


def tie_matmul(r, a, b, out) -> None:
    """``a @ b`` with numpy-style batch broadcasting and the 1-d special cases."""
    if a.ndim == 1 and b.ndim == 1:
        r.same(a[0], b[0])
        return
    if b.ndim == 1:
        r.same(a[-1], b[0])
        for d in range(a.ndim - 1):
            r.same(a[d], out[d])
        return
    if a.ndim == 1:
        r.same(a[0], b[-2])
        for d in range(b.ndim - 2):
            r.same(b[d], out[d])
        r.same(b[-1], out[-1])
        return
    r.same(a[-1], b[-2])
    r.same(a[-2], out[-2])
    r.same(b[-1], out[-1])
    for t in (a, b):
        for i in range(3, min(t.ndim, out.ndim) + 1):
            if t.shape[-i] == out.shape[-i]:
                r.same(t[-i], out[-i])
    if r.reads_input(a) and r.reads_input(b):  # activation x activation: attention written out (q @ k^T, p @ v)
        r.head_dim(a[-1])
        r.head_dim(b[-1])


def _matmul_signature(input, other, **kwargs):  # noqa: A002
    pass


@register(torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__")
def matmul(r) -> None:
    a = r.bind(_matmul_signature)
    tie_matmul(r, a["input"], a["other"], r.out)


def _addmm_signature(input, mat1, mat2, **kwargs):  # noqa: A002
    pass


@register(torch.addmm, torch.baddbmm, torch.addbmm, "addmm", "baddbmm")
def addmm(r) -> None:
    """``input + mat1 @ mat2``: the product's axes, with ``input`` broadcast onto them."""
    a = r.bind(_addmm_signature)
    tie_matmul(r, a["mat1"], a["mat2"], r.out)
    tie_broadcast(r, r.out, [a["input"]])


@register(torch.einsum)
def einsum(r) -> None:
    """Axes that share a subscript letter are the same axis; ``...`` dims align from the right."""
    equation, *operands = r.node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    tensors = [r.tensor(t) for t in operands]
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    specs = lhs.split(",")
    if not rhs and "->" not in equation:
        letters = "".join(specs).replace(".", "")
        rhs = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    ell_dims = max((t.ndim - len(s.replace("...", "")) for t, s in zip(tensors, specs) if "..." in s), default=0)
    ell = [chr(0x100 + i) for i in range(ell_dims)]  # private letters for the ellipsis dims

    def expand(spec: str, ndim: int) -> list[str]:
        if "..." not in spec:
            return list(spec)
        head, tail = spec.split("...")
        k = ndim - len(head) - len(tail)
        return list(head) + ell[ell_dims - k:] + list(tail)

    first: dict[str, tuple] = {}
    out = r.out
    views = [(t, expand(s, t.ndim)) for t, s in zip(tensors, specs)]
    if len(tensors) == 2 and all(r.reads_input(t) for t in tensors):  # attention as einsum
        batch = set(views[0][1]) & set(views[1][1]) & set(expand(rhs, out.ndim))
        for t, letters in views:
            for d, ch in enumerate(letters):
                if ch not in batch:  # the contraction and the free letters: head dims (or sequence, frozen anyway)
                    r.head_dim(t[d])
    views.append((out, expand(rhs, out.ndim)))
    for t, letters in views:
        for d, ch in enumerate(letters):
            if t.shape[d] == 1:
                continue
            if ch in first:
                r.same(first[ch], t[d])
            else:
                first[ch] = t[d]
