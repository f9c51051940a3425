"""``ZeroBranch``: what stands in a model for a residual branch removed in place.

Removing a branch in place (not its whole layer) cannot take the call out of the model's Python forward
(``h = x + self.self_attn(self.input_layernorm(x))``), so the modules of the branch are replaced by a module
without parameters that returns zeros of the shape the original returned: the add then returns ``x``. The shape
is the call's first tensor input's leading axes (batch, sequence, pixels: they follow the input) followed by
the original output's fixed trailing sizes, recorded once from a call on the example inputs; ``None`` outputs
(attention weights a fused kernel does not return) stay ``None``, and a tuple output stays a tuple.

A module that kept a key/value cache (its forward takes an argument annotated as a ``Cache``) still tells the
cache that its layer saw the new tokens, with one zero key and value of width 1 per token: transformers reads
the number of cached tokens from the cache of layer 0, so a layer whose attention branch was removed must not
leave that slot empty, or generation would start the next token at position 0.

``fxprune.load_pretrained`` puts these modules back when it reloads the model (``config.fxprune_zero_modules``
records them); the modules they replace are not saved, so a plain ``from_pretrained`` would build them at random.

Example::

    >>> zero = ZeroBranch([{"lead": 2, "tail": [64], "dtype": None}, None])
    >>> out, weights = zero(torch.randn(1, 8, 64))
    >>> out.abs().max().item(), weights
    (0.0, None)
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ZeroBranch(nn.Module):
    """Returns zeros shaped as the module it replaces did (see module docstring); holds no parameters.

    ``outputs``: one entry per output (a list means a tuple output, a dict a single one): ``None`` for a ``None``
    output, else ``{"lead": k, "tail": [...], "dtype": name}`` (the first ``k`` sizes of the first tensor input,
    then ``tail``; ``dtype`` None: the input's). ``cache``: the name of the forward argument that carried a key/value cache (or None), and
    ``layer_idx`` the cache slot of the replaced module.
    """

    def __init__(self, outputs, cache: str | None = None, layer_idx: int | None = None):
        super().__init__()
        self.outputs, self.cache, self.layer_idx = outputs, cache, layer_idx

    def forward(self, *args, **kwargs):
        ref = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if ref is None:
            raise TypeError("ZeroBranch needs a tensor input to shape its zeros")
        cache = kwargs.get(self.cache) if self.cache else None
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update") and ref.ndim >= 2:
            blank = ref.new_zeros(ref.shape[0], 1, ref.shape[1], 1)
            cache.update(blank, blank, self.layer_idx)
        if isinstance(self.outputs, list):
            return tuple(self._zeros(spec, ref) for spec in self.outputs)
        return self._zeros(self.outputs, ref)

    @staticmethod
    def _zeros(spec, ref: torch.Tensor):
        if spec is None:
            return None
        shape = (*ref.shape[:spec["lead"]], *spec["tail"])
        dtype = ref.dtype if spec.get("dtype") is None else getattr(torch, spec["dtype"])
        return ref.new_zeros(shape, dtype=dtype)

    def extra_repr(self) -> str:
        return f"outputs={self.outputs}, cache={self.cache!r}, layer_idx={self.layer_idx}"

    @staticmethod
    def spec(inputs, output):
        """The ``outputs`` record of a call: its inputs (args then kwargs values) and its output."""
        ref = next((a for a in inputs if isinstance(a, torch.Tensor)), None)

        def one(t):
            if t is None:
                return None
            if not isinstance(t, torch.Tensor) or ref is None:
                raise TypeError(f"ZeroBranch can stand for tensor or None outputs only, got {type(t).__name__}")
            lead = 0
            while lead < min(ref.ndim, t.ndim) - 1 and ref.shape[lead] == t.shape[lead]:
                lead += 1
            if t.ndim == ref.ndim and tuple(t.shape) == tuple(ref.shape):
                lead = t.ndim
            dtype = None if t.dtype == ref.dtype else str(t.dtype).split(".")[-1]  # None: the input's (a cast model)
            return {"lead": lead, "tail": [int(s) for s in t.shape[lead:]], "dtype": dtype}

        if isinstance(output, (tuple, list)):
            return [one(t) for t in output]
        return one(output)
