"""In place for any ``nn.Module``: ``prune(model, ..., inplace=True)`` changes the caller's own object.

Whatever captured the model (``symbolic_trace``, which calls copies of its torch modules, or ``torch.export``,
which calls none of them), the pruned graph is written into the caller's module tree by qualified name and the
caller's own forward is checked against it, or the model is put back exactly:

- :mod:`~fxprune.rewriting.inplace.mechanism`: the mechanism (:func:`prune_in_place`, :func:`write_into`,
  and :class:`Extension`, the hooks a library layer adds: the Hugging Face config and ``generate``);
- :mod:`~fxprune.rewriting.inplace.tensors`: tensors set by name (parameters stay parameters, buffers keep
  their persistence, ties stay ties);
- :mod:`~fxprune.rewriting.inplace.torch_modules`: widths torch modules restate (``in_features``,
  ``normalized_shape``, a convolution's ``groups`` from the graph ...);
- :mod:`~fxprune.rewriting.inplace.multihead`: ``nn.MultiheadAttention`` widths, or a
  ``PrunedMultiheadAttention`` swapped in;
- :mod:`~fxprune.rewriting.inplace.restated`: integer attributes of the model's own Python (decided by the
  rewritten graph's arguments, or followed by value and confirmed by the check);
- :mod:`~fxprune.rewriting.inplace.check`: the caller's forward against the pruned graph at two batch sizes;
- :mod:`~fxprune.rewriting.inplace.snapshot`: everything saved before and put back bit for bit on failure;
- :mod:`~fxprune.rewriting.inplace.freezes`: what analysis keeps whole because the model's own forward
  recomputes it.

Example::

    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    >>> fxprune.prune(model, 0.3, example_inputs=(torch.randn(1, 3, 32, 32),), inplace=True) is model
    True
"""

from fxprune.rewriting.inplace.snapshot import Snapshot
from fxprune.rewriting.inplace.mechanism import Change, Extension, prune_in_place, write_into

__all__ = ["Change", "Extension", "Snapshot", "prune_in_place", "write_into"]
