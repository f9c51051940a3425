"""aten ops, as ``torch.export`` graphs contain them: mostly the functional rules under aten names.

``RuleContext.bind`` reads an aten op's arguments by its schema and renames them
to the rule's (``self`` -> ``input``, ``size`` -> ``shape``), so
``aten.view.default(x, [2, 7, -1, 16])`` reaches the same rule as
``x.view(2, 7, -1, 16)``, and ``aten.linear.default`` the same as ``F.linear``.
Every overload of a listed op is registered (``aten.mean.dim``, ``aten.mean.default`` ...).

Only ops whose schema differs from the Python function's get a rule of their own
here: ``slice``, ``select``, ``embedding`` (weight first), batch-norm variants,
``native_layer_norm`` (a tuple output), ``gather`` and scans (top-k and tensor indexing: ``routing.py``).

``aten.max.other``/``min.other`` (``torch.max(a, b)``) are elementwise; the other ``max``/``min`` overloads are
reductions.
"""

from __future__ import annotations

import torch

from fxprune.algebra.context import TensorRef
from fxprune.rules import attention, conv, elementwise, linear, misc, norm, reduction, segments, shape, spatial
from fxprune.rules.registry import register

aten = torch.ops.aten

_INT64_MAX = 2**63 - 1


def overloads(*packets) -> list:
    """Every overload of the given aten op packets that exists in this torch build."""
    out = []
    for packet in packets:
        out.extend(getattr(packet, name) for name in packet.overloads())
    return out


def aten_family(rule, *packets) -> None:
    register(*overloads(*packets))(rule)


def _packets(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


aten_family(elementwise.elementwise, *_packets(
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "abs", "square", "reciprocal", "sign",
    "erf", "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "maximum", "minimum", "cos", "sin", "tanh",
    "sigmoid", "relu", "gelu", "silu", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish",
    "softplus", "floor", "ceil", "round", "rsub", "lt", "le", "gt", "ge", "eq", "ne", "__and__", "__or__",
    "bitwise_and", "bitwise_or", "bitwise_not", "logical_and", "logical_or", "logical_not", "clone", "contiguous",
    "detach", "alias", "lift_fresh_copy", "dropout", "zeros_like", "ones_like", "full_like", "empty_like",
    "fill", "remainder", "floor_divide", "isnan", "isinf", "log1p", "expm1", "addcmul", "addcdiv", "lerp",
    # in-place forms (shift_tokens_right, position-bias arithmetic)
    "copy_", "fill_", "masked_fill_", "add_", "sub_", "mul_", "div_", "zero_", "clamp_", "neg_",
))
aten_family(elementwise.cast, *_packets("to", "_to_copy", "type_as"))
aten_family(elementwise.softmax, *_packets("softmax", "_softmax", "log_softmax", "_log_softmax"))
aten_family(elementwise.triangular, *_packets("triu", "tril"))
aten_family(misc.metadata, *_packets("_assert_tensor_metadata", "sym_size", "size", "sym_numel", "sym_stride",
                                     "_assert_scalar", "sym_constrain_range_for_size"))
aten_family(misc.values_read, *_packets("item", "_local_scalar_dense", "nonzero", "nonzero_static", "argwhere",
                                        "_unique", "_unique2", "unique_dim", "unique_consecutive",
                                        "unique_dim_consecutive", "masked_select"))

aten_family(shape.view, *_packets("view", "reshape", "_unsafe_view"))
aten_family(shape.reshape_family, *_packets("unsqueeze", "squeeze", "flatten"))
aten_family(shape.unflatten, *_packets("unflatten"))
aten_family(shape.permute, *_packets("permute"))
aten_family(shape.transpose, *_packets("transpose", "swapaxes"))
aten_family(shape.matrix_transpose, *_packets("t", "numpy_T"))  # x.T: every axis reversed
aten_family(shape.expand, *_packets("expand", "broadcast_to"))
aten_family(shape.repeat, *_packets("repeat"))
aten_family(shape.repeat_interleave, *_packets("repeat_interleave"))
aten_family(shape.new_factory, *_packets("new_zeros", "new_ones", "new_empty"))
aten_family(shape.factory, *_packets("zeros", "ones", "empty"))
aten_family(shape.full, *_packets("full"))

aten_family(segments.cat, *_packets("cat", "concat"))
aten_family(segments.stack, *_packets("stack"))
aten_family(segments.split, *_packets("split", "split_with_sizes", "chunk"))
aten_family(segments.unbind, *_packets("unbind"))
aten_family(segments.narrow, *_packets("narrow"))

aten_family(linear.linear, *_packets("linear"))
aten_family(linear.matmul, *_packets("matmul", "mm", "bmm"))
aten_family(linear.addmm, *_packets("addmm", "baddbmm"))
aten_family(linear.einsum, *_packets("einsum"))
aten_family(conv.conv, *_packets("conv1d", "conv2d", "conv3d"))
aten_family(conv.conv_transpose, *_packets("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
aten_family(norm.layer_norm, *_packets("layer_norm", "rms_norm"))
aten_family(norm.group_norm, *_packets("group_norm"))
# aten.max.other / aten.min.other are torch.max(a, b): elementwise, not a reduction (as a reduction the output's
# axes were related to nothing: XGLM's attention clamps its scores with one, which split its heads into two groups)
_PAIRWISE = [aten.max.other, aten.min.other]
register(*[o for o in overloads(*_packets("sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "argmax",
                                          "argmin", "any", "all", "max", "min")) if o not in _PAIRWISE])(
    reduction.reduction)
register(*_PAIRWISE)(elementwise.elementwise)
aten_family(attention.scaled_dot_product_attention, *_packets("scaled_dot_product_attention"))
aten_family(spatial.pad, *_packets("constant_pad_nd", "pad"))
aten_family(spatial.roll, *_packets("roll"))
aten_family(norm.weight_norm, *_packets("_weight_norm"))
aten_family(spatial._pool(1), *_packets("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"))
aten_family(spatial._pool(2), *_packets("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                                        "_adaptive_avg_pool2d", "adaptive_max_pool2d"))
aten_family(spatial._pool(3), *_packets("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d"))
aten_family(spatial.interpolate, *_packets("upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d",
                                           "upsample_nearest1d", "upsample_linear1d", "upsample_nearest3d",
                                           "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa"))


def _slice_signature(input, dim=0, start=None, end=None, step=1):  # noqa: A002
    pass


@register(*overloads(aten.slice))
def slice_(r) -> None:
    """``aten.slice(x, dim, start, end)`` cuts ``x[dim]`` into (before, out, after)."""
    a = r.bind(_slice_signature)
    x, out = a["input"], r.out
    dim = a["dim"] % x.ndim
    stop = a["end"]
    if isinstance(stop, int) and stop >= _INT64_MAX:
        stop = None
    bounds = slice(a["start"], stop, a["step"])
    for d in range(x.ndim):
        if d != dim:
            r.same(x[d], out[d])
    if not all(isinstance(v, (int, type(None))) for v in (bounds.start, bounds.stop, bounds.step)):
        r.freeze(x[dim], "slice with computed bounds")
        r.freeze(out[dim], "slice with computed bounds")
        return
    start, end, step = bounds.indices(x.shape[dim])
    if step != 1:
        r.freeze(x[dim], "strided slice")
        r.freeze(out[dim], "strided slice")
        return
    if out.shape[dim] == x.shape[dim]:
        r.same(x[dim], out[dim])
        return
    pre, post = r.fresh(start), r.fresh(x.shape[dim] - max(end, start))
    r.concat(x[dim], [pre, out[dim], post])
    if a["start"] is not None:
        r.const("start", pre)
    if stop is not None:
        r.on_rewrite(_slice_end(pre, out[dim], post, stop))


def _slice_end(pre, mid, post, old_stop: int):
    def hook(node, sizes) -> None:
        n_pre, n_mid, n_post = sizes.new(pre), sizes.new(mid), sizes.new(post)
        stop = -n_post if old_stop < 0 else n_pre + n_mid
        args = list(node.args)
        if len(args) > 3:
            args[3] = stop
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "end": stop}

    return hook


def _select_signature(input, dim, index):  # noqa: A002
    pass


def _set_select_index(node, index: int) -> None:
    node.args = (*node.args[:2], index, *node.args[3:])


@register(*overloads(aten.select))
def select(r) -> None:
    """``x.select(dim, i)`` keeps one index of ``dim``: that axis freezes (unless only the result's shape is read:
    :func:`~fxprune.rules.misc.integer_index`), the others carry over."""
    a = r.bind(_select_signature)
    x, out = a["input"], r.out
    dim = a["dim"] % x.ndim
    misc.integer_index(r, x[dim], lambda node: node.args[2], _set_select_index)
    for d in range(x.ndim):
        if d != dim:
            r.same(x[d], out[d if d < dim else d - 1])


def _embedding_signature(weight, indices, *args, **kwargs):
    pass


@register(*overloads(aten.embedding))
def embedding(r) -> None:
    a = r.bind(_embedding_signature)
    ids, w, out = a["indices"], a["weight"], r.out
    for d in range(ids.ndim):
        r.same(ids[d], out[d])
    r.same(w[1], out[-1])
    r.freeze(w[0], "vocabulary (indexed by data)")


def _batch_norm_signature(input, weight=None, bias=None, running_mean=None, running_var=None,  # noqa: A002
                          *args, **kwargs):
    pass


@register(*overloads(*_packets("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                               "native_batch_norm", "instance_norm")))
def batch_norm(r) -> None:
    """aten's batch norms take (input, weight, bias, running_mean, running_var, ...); some return tuples."""
    a = r.bind(_batch_norm_signature)
    x = a["input"]
    out = r.out if r.out is not None else r.output(0)
    for d in range(x.ndim):
        r.same(x[d], out[d])
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = a.get(name)
        if isinstance(t, TensorRef) and t.ndim == 1:
            r.same(t[0], x[1])


def _native_layer_norm_signature(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002
    pass


@register(*overloads(aten.native_layer_norm))
def native_layer_norm(r) -> None:
    a = r.bind(_native_layer_norm_signature)
    x, out = a["input"], r.output(0)
    k = len(a["normalized_shape"])
    for d in range(x.ndim):
        r.same(x[d], out[d])
    for name in ("weight", "bias"):
        t = a.get(name)
        if isinstance(t, TensorRef):
            for i in range(t.ndim):
                r.same(t[i], x[x.ndim - t.ndim + i])
    for i in range(k):
        r.normalizes(x[x.ndim - k + i])
    for stats in (r.output(1), r.output(2)):
        if stats is not None:
            for d in range(x.ndim - k):
                r.same(stats[d], x[d])
    r.const("normalized_shape", [x[x.ndim - k + i] for i in range(k)])


@register(*overloads(aten.gather))
def gather(r) -> None:
    """``gather`` picks one position per output position (the index's shape): every axis keeps all its units.
    (``aten.index`` and ``index_select``, which carry the unindexed axes over, are in ``routing.py``.)"""
    r.freeze_all("indexing by a tensor")


def _scan_signature(input, dim=-1, *args, **kwargs):  # sort's dim defaults to -1 and export leaves it out  # noqa: A002
    pass


@register(*overloads(*_packets("cumprod", "diff", "flip", "sort", "cummax")))
def scan(r) -> None:
    """Scans and reorderings mix positions along ``dim`` (frozen); other axes carry over."""
    a = r.bind(_scan_signature)
    x = a["input"]
    dim = a["dim"]
    dims = {d % x.ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])} if x.ndim else set()
    for out in r.tensors_out():
        for d in range(x.ndim):
            if d in dims or out.ndim != x.ndim or out.shape[d] != x.shape[d]:
                r.freeze(x[d], "scanned axis")
                if d < out.ndim:
                    r.freeze(out[d], "scanned axis")
            else:
                r.same(x[d], out[d])
