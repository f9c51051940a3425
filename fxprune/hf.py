"""Hugging Face models pruned in place: they stay ``PreTrainedModel``s that generate, save and reload.

The graph is analysed through ``torch.export`` like any other; the pruned tensors
are then written back into the original module tree by name, module attributes
are updated from the new shapes, and ``model.config`` is updated where widths are
uniform across layers. Where they are not, the new shape of every resized
tensor is stored in ``config.fxprune_shapes`` and :func:`load_pretrained`
rebuilds the model with them.

One ``head_dim`` attribute serves q, k and v in HF attention, and RoPE's
``inv_freq`` is recomputed from the config when a model is reloaded, so head
dimensions are kept whole in place (heads, kv groups, MLP units and the hidden
size are pruned).

Example::

    >>> model = LlamaForCausalLM(config).eval()
    >>> fxprune.prune(model, 0.25, example_inputs=(ids,), inplace=True)
    >>> model.generate(ids, max_new_tokens=20)
    >>> model.save_pretrained(out); LlamaForCausalLM.from_pretrained(out)
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.layout import Prod

# Attribute names the transformers model families use for projections and head counts.
QUERY = ("q_proj", "query", "q", "q_lin")
KEY = ("k_proj", "key", "k", "k_lin")
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
HEAD_COUNTS = {
    "num_heads": "q", "num_attention_heads": "q", "n_heads": "q", "n_head": "q",
    "num_key_value_heads": "k", "num_kv_heads": "k",
}


def _child(module: nn.Module, names) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


def attention_modules(model: nn.Module):
    """(name, module) of every module with a head-dim attribute and a query projection."""
    for name, module in model.named_modules():
        if _child(module, QUERY) is not None and any(isinstance(getattr(module, a, None), int) for a in HEAD_DIM):
            yield name, module


def freeze_head_dims(dg, model: nn.Module) -> None:
    """Head-dim groups of every attention module keep all their units (see module docstring).

    The head dim is the trailing part of a projection's axis whose size is
    ``head_dim``; where the algebra did not separate it from the heads, the
    whole axis is kept.
    """
    for name, module in attention_modules(model):
        head_dim = next(getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int))
        reason = f"head dim of {name} (one head_dim attribute for q, k and v in place)"
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            for axis in (0, 1):
                try:
                    layout = dg.layout_of(f"{name}.{child_name}.weight", axis)
                except KeyError:
                    continue
                if not isinstance(layout, Prod) and layout.size(dg.solver) != head_dim:
                    continue  # a plain hidden-size axis
                for group in dg.groups_of_layout(_trailing(layout, head_dim, dg.solver)):
                    if reason not in group.frozen:
                        group.frozen.append(reason)


def _trailing(layout, size: int, solver):
    """The trailing factors of a layout whose sizes multiply to ``size`` (the whole layout if none do)."""
    factors = layout.factors if isinstance(layout, Prod) else (layout,)
    product = 1
    for i in range(len(factors) - 1, -1, -1):
        product *= factors[i].size(solver)
        if product == size:
            return Prod(tuple(factors[i:]))
        if product > size:
            break
    return layout


def write_back(model: nn.Module, pruned: nn.Module, clone: bool = True) -> None:
    """Copy every resized parameter and buffer of ``pruned`` into ``model`` by name, then fix attributes.

    ``clone=False`` moves the tensors instead, when ``pruned`` is thrown away afterwards.
    """
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    new = dict(pruned.named_parameters(remove_duplicate=False))
    new.update(dict(pruned.named_buffers(remove_duplicate=False)))
    for name, tensor in new.items():
        old = own.get(name)
        if old is None or old.shape == tensor.shape:
            continue
        set_tensor(model, name, tensor.detach().clone() if clone else tensor.detach())
    update_attributes(model)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, tensor)


def update_attributes(model: nn.Module) -> None:
    """Module attributes that restate tensor shapes, recomputed from the tensors."""
    for name, module in model.named_modules():
        try:
            _update_module(module)
        except (AttributeError, TypeError, ZeroDivisionError) as exc:
            raise FxPruneError(f"could not update the attributes of {name} ({type(module).__name__}): {exc}") from exc


def _update_module(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif type(module).__name__ == "Conv1D" and weight is not None:  # transformers' transposed linear
        module.nf = weight.shape[1]
    if _child(module, QUERY) is not None:
        _update_attention(module)
    elif isinstance(getattr(module, "intermediate_size", None), int):
        linears = [c for c in module.children() if isinstance(c, nn.Linear)]
        if linears:
            module.intermediate_size = linears[0].weight.shape[0]  # children are updated after their parent


def _update_attention(module: nn.Module) -> None:
    head_dim = next((getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int)), None)
    if not head_dim:
        return
    query, key = _child(module, QUERY), _child(module, KEY)
    q_out, hidden = query.weight.shape  # read shapes: children are updated after their parent
    sizes = {"q": q_out // head_dim, "k": (key.weight.shape[0] if key else q_out) // head_dim}
    for attr, which in HEAD_COUNTS.items():
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, sizes[which])
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = sizes["q"] // sizes["k"]
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = q_out
    for attr in ("hidden_size", "embed_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, hidden)


def update_config(model: nn.Module, original_shapes: dict) -> None:
    """Uniform widths go into ``model.config``; otherwise every resized tensor's shape is recorded."""
    config = getattr(model, "config", None)
    if config is None:
        return
    values: dict[str, set] = {}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        values["hidden_size"] = {embeddings.weight.shape[1]}
    for _, module in attention_modules(model):
        head_dim = next(getattr(module, a) for a in HEAD_DIM if isinstance(getattr(module, a, None), int))
        values.setdefault("head_dim", set()).add(head_dim)
        query, key = _child(module, QUERY), _child(module, KEY)
        values.setdefault("num_attention_heads", set()).add(query.out_features // head_dim)
        if key is not None:
            values.setdefault("num_key_value_heads", set()).add(key.out_features // head_dim)
    width = getattr(config, "intermediate_size", None)
    if isinstance(width, int) and width != getattr(config, "hidden_size", None):
        for name, module in model.named_modules():  # the MLP's first projections, found by their old width
            old = original_shapes.get(f"{name}.weight")
            if isinstance(module, nn.Linear) and old is not None and old[0] == width:
                values.setdefault("intermediate_size", set()).add(module.out_features)
    uniform = True
    for key, found in values.items():
        if len(found) == 1:
            if hasattr(config, key) or key == "head_dim":
                setattr(config, key, next(iter(found)))
        else:
            uniform = False
    if not uniform:
        config.fxprune_shapes = {name: list(t.shape) for name, t in _named_tensors(model).items()
                                 if tuple(t.shape) != original_shapes.get(name)}
    elif hasattr(config, "fxprune_shapes"):
        del config.fxprune_shapes


def _named_tensors(model: nn.Module) -> dict:
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out


def check_runs(model: nn.Module, example_inputs, kwargs=None) -> None:
    """Run the pruned model as the user will: plain forward, and ``generate`` with a cache where it exists."""
    kwargs = dict(kwargs or {})
    kwargs.pop("use_cache", None)
    with torch.no_grad():
        try:
            model(*example_inputs, **kwargs)
            if hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
                ids = example_inputs[0]
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                               pad_token_id=0)
        except Exception as exc:  # name the failure for the user; this is a bug in attribute updating
            raise FxPruneError(f"the model pruned in place no longer runs: {type(exc).__name__}: {exc}") from exc


def prune_in_place(dg, removal: dict, rewrite, verify):
    """Prune ``dg.model`` itself: rewrite a copy, verify it, write it back, update attributes and config."""
    model = dg.model
    original = {name: tuple(t.shape) for name, t in _named_tensors(model).items()}
    pruned = rewrite(dg, removal, inplace=False, share_tensors=True)
    verify(pruned, dg.example_inputs, dg.expected_shapes)
    saved = _snapshot(model)
    try:
        write_back(model, pruned, clone=False)  # the resized tensors are fresh copies that only `pruned` holds
        update_config(model, original)
        check_runs(model, dg.model_inputs, dg.model_kwargs)
    except Exception:  # a model that no longer runs is never left behind: put the original back
        _restore(model, saved)
        raise
    return model


_PLAIN = (int, float, bool, str, tuple, type(None))


def _snapshot(model: nn.Module) -> tuple:
    """What in-place pruning changes: tensor slots, plain attributes of every module, the config."""
    modules = [(m, dict(m._parameters), dict(m._buffers), {k: v for k, v in vars(m).items() if isinstance(v, _PLAIN)})
               for m in model.modules()]
    config = getattr(model, "config", None)
    return modules, config, copy.deepcopy(vars(config)) if config is not None else None


def _restore(model: nn.Module, saved: tuple) -> None:
    modules, config, config_state = saved
    for module, parameters, buffers, plain in modules:
        module._parameters.clear(), module._parameters.update(parameters)
        module._buffers.clear(), module._buffers.update(buffers)
        vars(module).update(plain)
    if config is not None:  # the same object: attention modules hold a reference to it
        vars(config).clear()
        vars(config).update(config_state)


def load_pretrained(path: str, **kwargs):
    """Load a model saved after non-uniform in-place pruning (``config.fxprune_shapes``); uniform ones too.

    The model class is ``config.architectures[0]``; every recorded tensor is
    resized before the saved weights are loaded.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    shapes = getattr(config, "fxprune_shapes", None)
    cls = getattr(transformers, config.architectures[0])
    if not shapes:
        return cls.from_pretrained(path, **kwargs)
    model = cls(config)
    for name, shape in shapes.items():
        set_tensor(model, name, torch.empty(shape))
    update_attributes(model)
    state = _load_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("inv_freq")]
    if missing or unexpected:
        raise FxPruneError(f"{path}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _load_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state
