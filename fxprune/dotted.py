"""A module's attribute by its dotted name (``"encoder.layer.0.fc.weight"``): the owner module and the last
name, and setting it. Reading goes through ``operator.attrgetter``; this is the writing half, used wherever a
stage puts a tensor, a module or a plain value back into a model by name. It sits at the bottom of the
package beside ``fxprune.errors`` and imports nothing of fxprune.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 3))
    >>> owner_of(model, "0.bias")[1]
    'bias'
    >>> set_attribute(model, "0.in_features", 4); model[0].in_features
    4
"""

from __future__ import annotations

import torch.nn as nn


def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module that holds name, the attribute's own name)``; ``root`` itself for an undotted name. Raises
    ``AttributeError`` (from ``get_submodule``) when the owner does not exist."""
    owner, _, attr = name.rpartition(".")
    return (root.get_submodule(owner) if owner else root), attr


def set_attribute(root: nn.Module, name: str, value) -> None:
    """``setattr`` on the owner of the dotted ``name`` (so ``nn.Module.__setattr__`` files a parameter, module
    or buffer where it belongs)."""
    module, attr = owner_of(root, name)
    setattr(module, attr, value)
