"""Rules for functions torchvision hides from symbolic tracing with ``torch.fx.wrap``.

They appear as single ``call_function`` nodes, so each needs a rule of its own.
Example: Swin's ``shifted_window_attention(x (B, H, W, C), qkv_weight (3C, C), ...)``
reshapes its qkv to ``(.., 3, num_heads, C // num_heads)`` and back to ``C``, so
the embedding axis is ``product(heads, head_dim)``; ``num_heads`` is a shape
constant rewritten after pruning.

Covered: Swin attention (``shifted_window_attention``), patch merging, stochastic depth.
"""

from __future__ import annotations

from fxprune.algebra.context import TensorRef
from fxprune.rules.elementwise import elementwise
from fxprune.rules.registry import family, register

# Registered by name: importing torchvision here would add ~1.5 s to ``import fxprune``.
SWIN = "torchvision.models.swin_transformer"


def _shifted_window_attention_signature(input, qkv_weight, proj_weight, relative_position_bias, window_size,  # noqa: A002
                                        num_heads, shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None,
                                        proj_bias=None, logit_scale=None, training=True):
    pass


def shifted_window_attention(r) -> None:
    a = r.bind(_shifted_window_attention_signature)
    x, out, qkv_w, proj_w = a["input"], r.out, a["qkv_weight"], a["proj_weight"]
    heads = int(a["num_heads"])
    h = r.fresh(heads, f"attention heads {r.where}")
    d = r.fresh(x.shape[-1] // heads, f"head dim {r.where}")
    three = r.fresh(3, f"q/k/v {r.where}")
    r.freeze(three, "q, k, v blocks")
    for dim in range(x.ndim):
        r.same(x[dim], out[dim])
    r.product(x[-1], [h, d])
    r.product(qkv_w[0], [three, h, d])
    r.same(qkv_w[1], x[-1])
    r.same(proj_w[0], x[-1])
    r.product(proj_w[1], [h, d])
    for name, layout in (("qkv_bias", qkv_w[0]), ("proj_bias", proj_w[0])):
        if isinstance(a[name], TensorRef):
            r.same(a[name][0], layout)
    bias = a["relative_position_bias"]
    r.same(bias[-3], h)
    if isinstance(a["logit_scale"], TensorRef):
        r.same(a["logit_scale"][0], h)
    else:
        # V1 scales q by (C // num_heads) ** -0.5, read from the pruned sizes at run time (there is no
        # scale argument to pin, as for sdpa): removing head-dim units changes the softmax temperature.
        # V2's cosine attention normalises q and k instead, where dead units change nothing.
        r.normalizes(d)
    r.const("num_heads", h)


def _relative_position_bias_signature(relative_position_bias_table, relative_position_index, window_size):
    pass


def relative_position_bias(r) -> None:
    a = r.bind(_relative_position_bias_signature)
    r.same(a["relative_position_bias_table"][-1], r.out[-3])
    r.freeze(a["relative_position_bias_table"][0], "relative position table")


def patch_merging_pad(r) -> None:
    """``(.., H, W, C) -> (.., H/2, W/2, 4C)``: four strided copies of C, concatenated."""
    x, out = r.input(0), r.out
    r.concat(out[-1], [x[-1]] * 4)
    for dim in range(x.ndim - 3):
        r.same(x[dim], out[dim])
    for dim in (-3, -2):
        r.freeze(x[dim], "spatial axis")
        r.freeze(out[dim], "spatial axis")


register(f"{SWIN}:shifted_window_attention")(shifted_window_attention)
register(f"{SWIN}:_get_relative_position_bias")(relative_position_bias)
register(f"{SWIN}:_patch_merging_pad")(patch_merging_pad)
family(elementwise, "torchvision.ops.stochastic_depth:stochastic_depth")
