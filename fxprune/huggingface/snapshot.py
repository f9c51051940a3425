"""What in-place pruning changes, saved before and put back exactly when it fails.

Tensor slots (``_parameters``, ``_buffers``), plain attributes (ints, floats, strings, tuples) of every module,
and the config's fields (the same config object: attention modules hold a reference to it).

Example::

    >>> saved = snapshot(model)
    >>> ...                          # write back, update attributes and config; something fails
    >>> restore(model, saved)        # the caller's model as it was
"""

from __future__ import annotations

import copy

import torch.nn as nn


_PLAIN = (int, float, bool, str, tuple, type(None))


def snapshot(model: nn.Module) -> tuple:
    """What in-place pruning changes: tensor slots, plain attributes of every module, the config."""
    modules = [(m, dict(m._parameters), dict(m._buffers), {k: v for k, v in vars(m).items() if isinstance(v, _PLAIN)})
               for m in model.modules()]
    config = getattr(model, "config", None)
    return modules, config, copy.deepcopy(vars(config)) if config is not None else None


def restore(model: nn.Module, saved: tuple) -> None:
    modules, config, config_state = saved
    for module, parameters, buffers, plain in modules:
        module._parameters.clear()
        module._parameters.update(parameters)
        module._buffers.clear()
        module._buffers.update(buffers)
        vars(module).update(plain)
    if config is not None:  # the same object: attention modules hold a reference to it
        vars(config).clear()
        vars(config).update(config_state)
