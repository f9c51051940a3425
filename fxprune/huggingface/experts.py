"""Mixture-of-experts modules of Hugging Face models pruned in place: attributes and config widths.

transformers 5 stores a block's experts as 3-d parameters (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``;
``(E, H, 2I)`` / ``(E, I, H)`` when the class is ``is_transposed``) in one module whose ``num_experts``,
``intermediate_dim`` and ``hidden_dim`` restate those shapes; a Qwen2-MoE block also has a dense
``shared_expert``. After pruning, the attributes follow the tensors and the config's widths follow the modules
where every layer agrees. Example (Mixtral, expert MLPs pruned from 48 to 32 units)::

    >>> update_expert_attributes(model.model.layers[0].mlp.experts)   # intermediate_dim = 32
    >>> expert_widths(model)
    {'intermediate_size': {32}}
"""

from __future__ import annotations

import torch.nn as nn


def is_experts(module: nn.Module) -> bool:
    """A module holding all experts of a block as 3-d parameters (``down_proj`` with a leading expert axis)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.ndim == 3 and isinstance(getattr(module, "num_experts", None), int)


def _widths(module: nn.Module) -> tuple[int, int, int]:
    """(experts, intermediate, hidden) read from ``down_proj``."""
    experts, a, b = module.down_proj.shape
    return (experts, a, b) if getattr(module, "is_transposed", False) else (experts, b, a)


def update_expert_attributes(module: nn.Module) -> None:
    """``num_experts``, ``intermediate_dim`` and ``hidden_dim`` of an experts module from its tensors."""
    experts, intermediate, hidden = _widths(module)
    for attr, value in (("num_experts", experts), ("intermediate_dim", intermediate), ("hidden_dim", hidden)):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def is_router(module: nn.Module) -> bool:
    """A top-k router: a ``weight (E, H)`` parameter with ``top_k`` and ``hidden_dim`` restating its shape."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, nn.Parameter) and weight.ndim == 2
            and isinstance(getattr(module, "top_k", None), int) and isinstance(getattr(module, "hidden_dim", None), int))


def update_router_attributes(module: nn.Module) -> None:
    """``num_experts`` and ``hidden_dim`` of a router from its weight (it reshapes its input by ``hidden_dim``)."""
    experts, hidden = module.weight.shape
    module.hidden_dim = hidden
    if isinstance(getattr(module, "num_experts", None), int):
        module.num_experts = experts


def update_expert_count(model: nn.Module) -> None:
    """The model's own ``num_experts`` (Mixtral's and Qwen2-MoE's load-balancing loss reads it), when every
    experts module agrees."""
    counts = {m.num_experts for m in model.modules() if is_experts(m)}
    if len(counts) == 1 and isinstance(getattr(model, "num_experts", None), int) and not is_experts(model):
        model.num_experts = counts.pop()


def expert_widths(model: nn.Module) -> dict[str, set]:
    """Config key -> the widths found for it: the experts' MLP width (``moe_intermediate_size`` where the config
    has one, Mixtral's ``intermediate_size`` otherwise), their number (``num_local_experts`` / ``num_experts``)
    and ``shared_expert_intermediate_size``."""
    config = model.config
    key = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
    values: dict[str, set] = {}
    count = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
    for name, module in model.named_modules():
        if is_experts(module):
            values.setdefault(key, set()).add(_widths(module)[1])
            if hasattr(config, count):
                values.setdefault(count, set()).add(_widths(module)[0])
        elif name.endswith(".shared_expert") and hasattr(config, "shared_expert_intermediate_size"):
            first = next((c for c in module.children() if isinstance(c, nn.Linear)), None)
            if first is not None:
                values.setdefault("shared_expert_intermediate_size", set()).add(first.out_features)
    return values

