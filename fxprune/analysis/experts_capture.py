"""Mixture-of-experts blocks exported without their data-dependent loop.

transformers' ``eager`` experts loop over the experts that some token picked (``nonzero`` of the routing
mask, then ``where`` per expert): a graph whose length depends on the data, which ``torch.export`` refuses.
The same experts also compute the same function with one grouped matmul over offsets (``grouped_mm``), a graph
of fixed ops. While capturing, every config that asks for ``eager`` experts asks for ``grouped_mm``; it is put
back afterwards, so the caller's model keeps running its own implementation. transformers releases without a
portable grouped matmul (5.0 needs ``torch._grouped_mm``, torch >= 2.9) get ``batched_mm`` (the expert weights
gathered per token, then ``bmm``: fixed ops too, more memory). Example::

    >>> with grouped_experts(model):        # model.config._experts_implementation == "eager"
    ...     program = torch.export.export(model, (ids,), strict=False)
    >>> model.config._experts_implementation
    'eager'
"""

from __future__ import annotations

import contextlib


def _configs(model) -> list:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_experts_implementation"):
            seen.add(id(config))
            out.append(config)
    return out


def static_implementation() -> str:
    """``grouped_mm`` where transformers runs it on any device (its own fallback op), else ``batched_mm``."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return "batched_mm"
    return "grouped_mm" if hasattr(moe, "_grouped_mm_fallback") else "batched_mm"


@contextlib.contextmanager
def grouped_experts(model):
    """Within the block, configs of ``model`` with ``eager`` experts use fixed ops (:func:`static_implementation`);
    restored on exit."""
    changed, implementation = [], None
    try:
        for config in _configs(model):
            if config._experts_implementation == "eager":
                changed.append(config)
                implementation = implementation or static_implementation()
                config._experts_implementation = implementation
        yield
    finally:
        for config in changed:
            config._experts_implementation = "eager"
